INSERT INTO commandbus.batch (
    domain, batch_id, batch_type, name, custom_data, status, total_count, completed_count,
    failed_count, canceled_count, in_troubleshooting_count, created_at, started_at, completed_at)
VALUES ($1::text, $2::uuid, $3::text, $4::text, $5::jsonb, $6::text, $7::int, $8::int, $9::int,
        $10::int, $11::int, $12::timestamptz, $13::timestamptz, $14::timestamptz)
