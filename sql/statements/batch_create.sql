SELECT command_id, msg_id, correlation_id FROM commandbus.create_batch_v2($1::text, $2::uuid, $3::text, $4::text, $5::jsonb, $6::uuid[], $7::text[], $8::jsonb[], $9::uuid[], $10::text[], $11::int[])
