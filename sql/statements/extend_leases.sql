SELECT commandbus.extend_leases_v1($1::text, $2::uuid[], $3::bigint[], $4::int[], $5::int) AS extended
