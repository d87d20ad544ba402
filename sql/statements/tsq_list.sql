SELECT c.domain, c.command_id, c.command_type, c.attempts, c.max_attempts, c.last_error_type,
       c.last_error_code, c.last_error_msg, c.correlation_id, nullif(c.reply_queue, '') AS reply_to,
       commandbus.tsq_archived_message_v1(c.domain, c.msg_id) AS payload, c.created_at, c.updated_at
FROM commandbus.command c
WHERE c.domain = $1::text
  AND c.in_tsq AND c.status = 'IN_TROUBLESHOOTING_QUEUE'
  AND ($2::text IS NULL OR c.command_type = $2::text)
ORDER BY c.updated_at DESC, c.command_id
LIMIT $3::int OFFSET $4::int
