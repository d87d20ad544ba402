SELECT EXISTS (SELECT 1 FROM commandbus.batch WHERE domain = $1::text AND batch_id = $2::uuid) AS found
