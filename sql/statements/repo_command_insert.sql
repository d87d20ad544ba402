INSERT INTO commandbus.command AS c (
    domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts,
    correlation_id, reply_queue, created_at, updated_at, batch_id)
SELECT t.domain, t.queue_name, t.msg_id, t.command_id, t.command_type, t.status, t.attempts,
       t.max_attempts, t.correlation_id, coalesce(t.reply_queue, ''), coalesce(t.created_at, now()),
       coalesce(t.updated_at, now()), t.batch_id
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::int[],
            $8::int[], $9::uuid[], $10::text[], $11::timestamptz[], $12::timestamptz[], $13::uuid[])
     AS t(domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts,
          correlation_id, reply_queue, created_at, updated_at, batch_id)
ON CONFLICT (domain, command_id) DO NOTHING
RETURNING c.command_id
