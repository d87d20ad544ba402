SELECT examined, affected, cutoff, last_command_id
FROM commandbus.tsq_cancel_all_v1($1::text, $2::text, $3::text, $4::text, $5::int, $6::timestamptz, $7::uuid)
