SELECT s.msg_id FROM pgmq.send_batch($1::text, $2::jsonb[], $3::int) WITH ORDINALITY AS s(msg_id, n) ORDER BY s.n
