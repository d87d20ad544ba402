SELECT domain, batch_id, batch_type, name, custom_data, status, total_count, completed_count,
       failed_count, canceled_count, in_troubleshooting_count, created_at, started_at, completed_at
FROM commandbus.batch
WHERE domain = $1::text AND ($2::text IS NULL OR status = $2::text)
ORDER BY created_at DESC, batch_id
LIMIT $3::int OFFSET $4::int
