SELECT commandbus.tsq_complete_v1($1::text, $2::uuid, $3::jsonb, $4::text)
