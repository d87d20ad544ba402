UPDATE commandbus.command
SET status = $3::text,
    last_error_type = coalesce($4::text, last_error_type),
    last_error_code = coalesce($5::text, last_error_code),
    last_error_msg = coalesce($6::text, last_error_msg),
    updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid
