SELECT count(*), count(DISTINCT command_id) FROM commandbus.audit WHERE domain = $1::text AND event_type = 'COMPLETED' AND command_id = ANY ($2::uuid[])
