SELECT b.domain, b.batch_id, b.batch_type, b.name, b.custom_data, b.status, b.total_count,
       b.completed_count, b.failed_count, b.canceled_count, b.in_troubleshooting_count,
       b.created_at, b.started_at, b.completed_at
FROM unnest($1::text[], $2::uuid[]) AS k(domain, batch_id)
JOIN commandbus.batch b ON b.domain = k.domain AND b.batch_id = k.batch_id
