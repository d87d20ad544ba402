SELECT pgmq.delete($1::text, $2::bigint) AS deleted
