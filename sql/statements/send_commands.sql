SELECT msg_id FROM commandbus.send_commands_v2($1::text, $2::uuid[], $3::text[], $4::jsonb[], $5::uuid[], $6::text[], $7::int[], $8::uuid[])
