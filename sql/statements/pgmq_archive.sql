SELECT pgmq.archive($1::text, $2::bigint) AS archived
