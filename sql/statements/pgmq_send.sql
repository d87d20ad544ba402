SELECT s.msg_id FROM pgmq.send($1::text, $2::jsonb, $3::int) AS s(msg_id) CROSS JOIN LATERAL pg_notify($4::text, '') AS n
