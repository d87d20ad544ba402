SELECT command_id FROM commandbus.command WHERE domain = $1::text AND command_id = ANY ($2::uuid[])
