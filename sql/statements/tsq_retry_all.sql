SELECT examined, affected, cutoff, last_command_id
FROM commandbus.tsq_retry_all_v1($1::text, $2::text, $3::text, $4::int, $5::timestamptz, $6::uuid)
