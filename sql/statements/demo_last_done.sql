SELECT extract(epoch FROM max(updated_at) - $1::timestamptz) FROM commandbus.command WHERE domain = $2::text AND command_id = ANY ($3::uuid[])
