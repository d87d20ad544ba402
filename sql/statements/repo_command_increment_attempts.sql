UPDATE commandbus.command SET attempts = attempts + 1, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid
RETURNING attempts
