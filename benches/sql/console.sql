-- The queries of benches/console.py (the format of sql/statements/): synthetic data written
-- with generate_series (not through the bus), and the throughput rounds' clock.

-- name: console_fill_commands
-- Inserts n command rows over three domains, created evenly over the last 7 days (oldest
-- first): 96% COMPLETED, 1% each FAILED, CANCELED, IN_TROUBLESHOOTING_QUEUE and PENDING; the
-- first 100,000 in ten batches of 10,000 (batch ids from the block number).
-- $1 n INT
INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type, status,
                                attempts, max_attempts, last_error_type, last_error_code,
                                last_error_msg, created_at, updated_at, batch_id, result)
SELECT d.domain, d.domain || '__commands', i, gen_random_uuid(),
       (ARRAY['Charge', 'Refund', 'Invoice', 'Ship'])[1 + i % 4],
       s.status, CASE WHEN s.status = 'PENDING' THEN 0 ELSE 1 END, 3,
       CASE WHEN s.status IN ('FAILED', 'IN_TROUBLESHOOTING_QUEUE') THEN 'PERMANENT' END,
       CASE WHEN s.status IN ('FAILED', 'IN_TROUBLESHOOTING_QUEUE') THEN 'DECLINED' END,
       CASE WHEN s.status IN ('FAILED', 'IN_TROUBLESHOOTING_QUEUE') THEN 'card declined' END,
       t.created_at, t.created_at + interval '20 milliseconds',
       CASE WHEN i <= 100000 THEN md5('batch' || ((i - 1) / 10000))::uuid END,
       CASE WHEN s.status = 'COMPLETED' THEN '{"ok": true}'::jsonb END
FROM generate_series(1, $1::int) AS i
CROSS JOIN LATERAL (SELECT (ARRAY['orders', 'billing', 'shipping'])[1 + i % 3] AS domain) d
CROSS JOIN LATERAL (SELECT CASE i % 100 WHEN 96 THEN 'FAILED' WHEN 97 THEN 'CANCELED'
                                        WHEN 98 THEN 'IN_TROUBLESHOOTING_QUEUE'
                                        WHEN 99 THEN 'PENDING' ELSE 'COMPLETED' END AS status) s
CROSS JOIN LATERAL (SELECT now() - interval '7 days' * (1 - i::float8 / $1::int) AS created_at) t

-- name: console_fill_batches
-- The batch rows of the first 100,000 commands (ten COMPLETED_WITH_FAILURES batches).
-- No parameters.
INSERT INTO commandbus.batch (domain, batch_id, name, status, total_count, completed_count,
                              canceled_count, in_troubleshooting_count, failed_count,
                              created_at, completed_at)
SELECT c.domain, c.batch_id, 'bench batch', 'COMPLETED_WITH_FAILURES', count(*),
       count(*) FILTER (WHERE c.status = 'COMPLETED'), count(*) FILTER (WHERE c.status = 'CANCELED'),
       count(*) FILTER (WHERE c.status = 'IN_TROUBLESHOOTING_QUEUE'),
       count(*) FILTER (WHERE c.status = 'FAILED'), min(c.created_at), max(c.updated_at)
FROM commandbus.command c
WHERE c.batch_id IS NOT NULL
GROUP BY c.domain, c.batch_id

-- name: console_some_batch
-- One batch id (the batch filter's case).
-- No parameters.
SELECT batch_id FROM commandbus.batch ORDER BY batch_id LIMIT 1

-- name: console_fill_audit
-- Inserts per_command audit rows for every command (SENT, RECEIVED, the outcome, then more
-- RECEIVED rows), in time order, so audit_id follows ts as it does when workers write them.
-- $1 per_command INT
INSERT INTO commandbus.audit (domain, command_id, event_type, ts, details_json)
SELECT c.domain, c.command_id,
       CASE WHEN e = 1 THEN 'SENT' WHEN e = 3 THEN
            CASE c.status WHEN 'COMPLETED' THEN 'COMPLETED' WHEN 'FAILED' THEN 'BUSINESS_RULE_FAILED'
                          WHEN 'IN_TROUBLESHOOTING_QUEUE' THEN 'MOVED_TO_TSQ'
                          WHEN 'CANCELED' THEN 'OPERATOR_CANCEL' ELSE 'RECEIVED' END
            ELSE 'RECEIVED' END,
       c.created_at + interval '10 milliseconds' * (e - 1),
       jsonb_build_object('msg_id', c.msg_id, 'attempt', 1)
FROM commandbus.command c CROSS JOIN generate_series(1, $1::int) AS e
ORDER BY c.created_at + interval '10 milliseconds' * (e - 1)

-- name: console_fill_queue
-- Queue messages of a domain's PENDING commands (so queue depth and the oldest waiting
-- command have something to show).
-- $1 domain TEXT
SELECT count(*) FROM pgmq.send_batch($1::text || '__commands', ARRAY(
    SELECT jsonb_build_object('domain', c.domain, 'command_type', c.command_type,
                              'command_id', c.command_id, 'data', '{}'::jsonb)
    FROM commandbus.command c WHERE c.domain = $1::text AND c.status = 'PENDING'))

-- name: console_create_queue
-- Creates a domain's command queue unless it exists.
-- $1 domain TEXT
SELECT commandbus.ensure_queue_v1($1::text || '__commands')

-- name: console_analyze
-- Refreshes the statistics of the command table (autovacuum would, a little later).
-- No parameters.
ANALYZE commandbus.command

-- name: console_clock
-- The server's clock (the start of a throughput round).
-- No parameters.
SELECT clock_timestamp()

-- name: console_queue_empty
-- Whether the queue of domain `bench` holds no message (its round's commands are finished).
-- No parameters.
SELECT NOT EXISTS (SELECT 1 FROM pgmq.q_bench__commands)

-- name: console_last_done
-- When a domain's last command finished (the end of a throughput round).
-- $1 domain TEXT
SELECT max(updated_at) FROM commandbus.command WHERE domain = $1::text

-- name: console_sizes
-- Rows in the command and audit tables (reported with the figures).
-- No parameters.
SELECT (SELECT count(*) FROM commandbus.command), (SELECT count(*) FROM commandbus.audit)
