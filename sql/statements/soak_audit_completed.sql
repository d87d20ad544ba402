SELECT count(*) FROM commandbus.audit WHERE domain = $1::text AND event_type = 'COMPLETED'
