SELECT domain, command_id, command_type, status, attempts, max_attempts, msg_id, correlation_id,
       nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code, last_error_msg,
       created_at, updated_at, batch_id, result
FROM commandbus.command
WHERE domain = $1::text AND batch_id = $2::uuid AND ($3::text IS NULL OR status = $3::text)
ORDER BY created_at, msg_id, command_id
LIMIT $4::int OFFSET $5::int
