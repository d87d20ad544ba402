UPDATE commandbus.command SET status = $3::text, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid
