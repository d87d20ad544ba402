SELECT domain, command_id, command_type, status, attempts, max_attempts, msg_id, correlation_id,
       nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code, last_error_msg,
       created_at, updated_at, batch_id, result
FROM commandbus.command
WHERE ($1::text IS NULL OR status = $1::text)
  AND ($2::text IS NULL OR domain = $2::text)
  AND ($3::text IS NULL OR command_type = $3::text)
  AND ($4::timestamptz IS NULL OR created_at >= $4::timestamptz)
  AND ($5::timestamptz IS NULL OR created_at <= $5::timestamptz)
ORDER BY created_at DESC, command_id
LIMIT $6::int OFFSET $7::int
