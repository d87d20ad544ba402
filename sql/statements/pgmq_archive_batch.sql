SELECT a.msg_id FROM pgmq.archive($1::text, $2::bigint[]) AS a(msg_id)
