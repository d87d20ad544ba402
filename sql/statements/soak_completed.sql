SELECT count(*) FROM commandbus.command WHERE domain = $1::text AND status = 'COMPLETED'
