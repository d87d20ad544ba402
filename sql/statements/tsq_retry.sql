SELECT commandbus.tsq_retry_v1($1::text, $2::uuid, $3::text) AS msg_id
