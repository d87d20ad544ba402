SELECT domain, batch_id, batch_type, name, custom_data, status, total_count, completed_count,
       failed_count, canceled_count, in_troubleshooting_count, created_at, started_at, completed_at
FROM commandbus.batch
WHERE domain = $1::text AND batch_id = $2::uuid
