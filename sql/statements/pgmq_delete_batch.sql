SELECT d.msg_id FROM pgmq.delete($1::text, $2::bigint[]) AS d(msg_id)
