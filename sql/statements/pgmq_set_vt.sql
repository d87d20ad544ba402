SELECT msg_id FROM pgmq.set_vt($1::text, $2::bigint, $3::int)
