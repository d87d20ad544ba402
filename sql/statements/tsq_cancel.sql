SELECT commandbus.tsq_cancel_v1($1::text, $2::uuid, $3::text, $4::text)
