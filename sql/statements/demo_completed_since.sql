SELECT count(*) FROM commandbus.command WHERE updated_at >= $1::timestamptz AND domain = $2::text AND status = 'COMPLETED'
