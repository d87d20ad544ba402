SELECT EXISTS (SELECT 1 FROM commandbus.command WHERE domain = $1::text AND command_id = $2::uuid) AS found
