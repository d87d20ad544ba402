SELECT commandbus.apply_batch_delta_v1($1::text, $2::uuid, $3::int, $4::int, $5::int, $6::int) AS completed
