UPDATE commandbus.command
SET last_error_type = $3::text, last_error_code = $4::text, last_error_msg = $5::text, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid
