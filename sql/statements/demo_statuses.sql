SELECT status, count(*) FROM commandbus.command WHERE domain = $1::text AND command_id = ANY ($2::uuid[]) GROUP BY status ORDER BY status
