SELECT msg_id, read_ct, enqueued_at, vt, message FROM pgmq.read($1::text, $2::int, $3::int) ORDER BY msg_id
