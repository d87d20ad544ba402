SELECT command_id, status FROM commandbus.complete_commands_v1($1::text, $2::uuid[], $3::bigint[], $4::int[], $5::jsonb[])
