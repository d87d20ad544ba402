SELECT commandbus.release_commands_v1($1::text, $2::uuid[], $3::bigint[], $4::int[]) AS released
