UPDATE commandbus.command SET msg_id = $3::bigint, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid
