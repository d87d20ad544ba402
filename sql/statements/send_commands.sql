SELECT command_id, msg_id, correlation_id FROM commandbus.send_commands_v1($1::text, $2::uuid[], $3::text[], $4::jsonb[], $5::uuid[], $6::text[], $7::int[], $8::uuid[])
