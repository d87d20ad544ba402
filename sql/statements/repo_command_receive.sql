UPDATE commandbus.command
SET attempts = attempts + 1, status = $3::text, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid AND status NOT IN ('COMPLETED', 'CANCELED')
RETURNING domain, command_id, command_type, status, attempts, max_attempts, msg_id, correlation_id,
          nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code, last_error_msg,
          created_at, updated_at, batch_id, result
