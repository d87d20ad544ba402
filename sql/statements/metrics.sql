-- Read at scrape time by the metrics endpoint (commandbus.metrics) and by health checks.

-- name: queue_metrics
-- Per command queue of $1 that exists: its domain, its message count (waiting, leased or
-- backing off), the age in seconds of its oldest message (NULL when empty), the domain's
-- TSQ size (partial index ix_command_tsq), and the queue table's dead rows and seconds since
-- its last vacuum (NULL: never) as the statistics collector has them: every lease scans past
-- the dead rows not yet vacuumed (V005). One count over each queue table: the queue holds
-- only unfinished work. The queues are looked up first (materialized) so pgmq.metrics never
-- runs for a queue that does not exist.
-- $1 queue_names TEXT[]
WITH q AS MATERIALIZED (
    SELECT m.queue_name, left(m.queue_name, -length('__commands')) AS domain,
           to_regclass(format('pgmq.%I', 'q_' || m.queue_name)) AS tbl
    FROM pgmq.meta m
    WHERE m.queue_name = ANY ($1::text[])
)
SELECT q.domain, s.queue_length, s.oldest_msg_age_sec,
       (SELECT count(*) FROM commandbus.command c
        WHERE c.domain = q.domain AND c.in_tsq AND c.status = 'IN_TROUBLESHOOTING_QUEUE') AS tsq,
       st.n_dead_tup AS dead_rows,
       extract(epoch FROM now() - greatest(st.last_vacuum, st.last_autovacuum))::float8
           AS vacuum_age
FROM q CROSS JOIN LATERAL pgmq.metrics(q.queue_name) AS s
LEFT JOIN pg_stat_all_tables st ON st.relid = q.tbl
ORDER BY q.domain

-- name: ping
-- Readiness of a worker: the database answers.
-- No parameters.
SELECT 1

-- name: message_trace_contexts
-- The trace contexts carried by claimed messages (commandbus.tracing, once per claimed batch
-- when tracing is instrumented); only messages that carry one.
-- $1 msg_ids BIGINT[], {queue_table} the quoted name of the domain's queue table
SELECT msg_id, message->'trace_context' FROM pgmq.{queue_table}
WHERE msg_id = ANY ($1::bigint[]) AND message ? 'trace_context'
