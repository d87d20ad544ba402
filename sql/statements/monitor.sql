-- The monitor read model (python/commandbus/ops/monitor.py): the console's dashboard and lists.
-- Each statement is bounded by an index range or a cap, never a count over the whole command or
-- audit table (see sql/migrations/V002__console.sql for the choices).

-- name: monitor_domains
-- The domains that have a command queue (`<domain>__commands` in pgmq.meta), in name order.
-- No parameters.
SELECT left(queue_name, -length('__commands')) AS domain
FROM pgmq.meta
WHERE queue_name LIKE '%\_\_commands'
ORDER BY 1

-- name: monitor_queue_stats
-- A queue's depth (exact up to the cap), messages leased or delayed, oldest visible message
-- (queue_stats_v1); NULLs when the queue does not exist.
-- $1 queue TEXT, $2 cap INT
SELECT depth, depth_exact, leased, oldest_visible, now() AS at
FROM commandbus.queue_stats_v1($1::text, $2::int)

-- name: monitor_tsq_counts
-- The number of TSQ commands per domain, exact (an index-only walk of ix_command_tsq).
-- No parameters.
SELECT domain, count(*) AS n
FROM commandbus.command
WHERE in_tsq
GROUP BY domain

-- name: monitor_status_estimates
-- The estimated number of commands per (domain, status), summed over the command table's
-- partitions: in each, each pair's share at its last ANALYZE (its multivariate statistics
-- <partition>_domain_status) times its current row count as the planner estimates it (rows per
-- page at the last ANALYZE times the pages now). Nothing for a partition never analyzed, or for
-- a role that cannot read the statistics (not the owner).
-- No parameters.
SELECT s.most_common_vals[i][1] AS domain, s.most_common_vals[i][2] AS status,
       sum(round(s.most_common_freqs[i]
                 * CASE WHEN c.relpages > 0
                        THEN c.reltuples / c.relpages
                             * (pg_relation_size(c.oid) / current_setting('block_size')::int)
                        ELSE greatest(c.reltuples, 0) END))::bigint AS estimate
FROM pg_inherits h
JOIN pg_class c ON c.oid = h.inhrelid
JOIN pg_stats_ext s
  ON s.statistics_schemaname = 'commandbus' AND s.statistics_name = c.relname || '_domain_status'
     AND NOT s.inherited
CROSS JOIN LATERAL generate_subscripts(s.most_common_freqs, 1) AS i
WHERE h.inhparent = 'commandbus.command'::regclass
GROUP BY 1, 2

-- name: monitor_throughput_start
-- Where a throughput read starts: the start of the bucket of now() - window (or `since`, when
-- later), and the id of the newest audit row older than that (found by walking the primary
-- key backwards from the newest row: the cost follows the rows of the window, not the table);
-- with now() and the newest audit row's id.
-- $1 window_seconds INT, $2 bucket_seconds INT, $3 since TIMESTAMPTZ
WITH w AS (
    SELECT now() AS at,
           greatest(date_bin(make_interval(secs => $2::int), now() - make_interval(secs => $1::int),
                             TIMESTAMPTZ '2000-01-01 00:00:00+00'),
                    coalesce($3::timestamptz, '-infinity')) AS start
)
SELECT w.at, w.start,
       coalesce((SELECT a.audit_id FROM commandbus.audit a
                 WHERE a.ts < w.start ORDER BY a.audit_id DESC LIMIT 1), 0) AS after_id,
       coalesce((SELECT max(a.audit_id) FROM commandbus.audit a), 0) AS last_id
FROM w

-- name: monitor_throughput_head
-- The database's clock and the newest audit row's id (a backward step of each partition's
-- primary key): where an incremental throughput read ends.
-- No parameters.
SELECT now() AS at, coalesce((SELECT max(a.audit_id) FROM commandbus.audit a), 0) AS last_id

-- name: monitor_throughput
-- Commands completed and failed (moved to the TSQ, or failed by a business rule) per domain
-- and bucket of $2 seconds, from the audit rows with audit_id in ($1, $4] at or after `start`.
-- A closed primary-key range given as values: estimated from the statistics, or (a table
-- never analyzed, or rows newer than its histogram) as a narrow range; never a table scan.
-- $1 after_id BIGINT, $2 bucket_seconds INT, $3 start TIMESTAMPTZ, $4 last_id BIGINT
SELECT a.domain,
       date_bin(make_interval(secs => $2::int), a.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
       count(*) FILTER (WHERE a.event_type = 'COMPLETED') AS completed,
       count(*) FILTER (WHERE a.event_type <> 'COMPLETED') AS failed
FROM commandbus.audit a
WHERE a.audit_id > $1::bigint AND a.audit_id <= $4::bigint AND a.ts >= $3::timestamptz
  AND a.event_type IN ('COMPLETED', 'MOVED_TO_TSQ', 'BUSINESS_RULE_FAILED')
GROUP BY 1, 2
ORDER BY 2, 1

-- name: monitor_workers
-- The worker connections of this database (the engine names them `rcmd worker <domain>
-- <host>:<pid>`), one row per worker process.
-- No parameters.
SELECT application_name, count(*) AS connections,
       count(*) FILTER (WHERE state = 'active') AS active,
       min(backend_start) AS connected_since,
       max(coalesce(state_change, backend_start)) AS last_change,
       now() AS at
FROM pg_stat_activity
WHERE application_name LIKE 'rcmd worker %' AND datname = current_database()
GROUP BY application_name
ORDER BY application_name

-- name: monitor_list_commands
-- One page of commands, newest first (created_at, then command_id, descending), after a keyset
-- cursor. The filters on columns the hot path writes have no index: the rows are read from
-- ix_command_created in order, at most $10 of them per call, and the matching ones, up to $9,
-- returned; the read stops as soon as $9 matched (a page of a common filter reads ~$9 rows).
-- $1 domain TEXT, $2 status TEXT, $3 command_type TEXT, $4 batch_id UUID,
-- $5 created_after TIMESTAMPTZ, $6 created_before TIMESTAMPTZ, $7 cursor_created_at TIMESTAMPTZ,
-- $8 cursor_command_id UUID, $9 limit INT, $10 scan_limit INT
SELECT s.*
FROM (
    SELECT domain, command_id, command_type, status, attempts, max_attempts, msg_id,
           correlation_id, nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code,
           last_error_msg, created_at, updated_at, batch_id, result,
           ($1::text IS NULL OR domain = $1::text)
           AND ($2::text IS NULL OR status = $2::text)
           AND ($3::text IS NULL OR command_type = $3::text)
           AND ($4::uuid IS NULL OR batch_id = $4::uuid) AS hit
    FROM commandbus.command
    WHERE created_at >= coalesce($5::timestamptz, '-infinity')
      AND created_at <= coalesce($6::timestamptz, 'infinity')
      AND created_at <= coalesce($7::timestamptz, 'infinity')
      AND (created_at < coalesce($7::timestamptz, 'infinity')
           OR command_id < coalesce($8::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
    ORDER BY created_at DESC, command_id DESC
    LIMIT $10::int
) s
WHERE s.hit
LIMIT $9::int

-- name: monitor_list_batch_commands
-- One page of a batch's commands (optionally of one status / type), newest first, after a
-- keyset cursor: the batch's rows through ix_command_batch (materialized, so the planner
-- cannot walk ix_command_created from now instead, which reads the whole table for a batch
-- created long ago), the newest $7 of them kept.
-- $1 domain TEXT, $2 batch_id UUID, $3 status TEXT, $4 command_type TEXT,
-- $5 cursor_created_at TIMESTAMPTZ, $6 cursor_command_id UUID, $7 limit INT
WITH b AS MATERIALIZED (
    SELECT domain, command_id, command_type, status, attempts, max_attempts, msg_id,
           correlation_id, nullif(reply_queue, '') AS reply_to, last_error_type,
           last_error_code, last_error_msg, created_at, updated_at, batch_id, result
    FROM commandbus.command
    WHERE domain = $1::text AND batch_id = $2::uuid
)
SELECT * FROM b
WHERE ($3::text IS NULL OR status = $3::text)
  AND ($4::text IS NULL OR command_type = $4::text)
  AND created_at <= coalesce($5::timestamptz, 'infinity')
  AND (created_at < coalesce($5::timestamptz, 'infinity')
       OR command_id < coalesce($6::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
ORDER BY created_at DESC, command_id DESC
LIMIT $7::int

-- name: monitor_scan_end
-- Where a list_commands read of $5 rows ended (its last row), for a page that found fewer
-- matches than asked: the cursor that resumes the scan. No row when fewer than $5 are left.
-- $1 created_after TIMESTAMPTZ, $2 created_before TIMESTAMPTZ, $3 cursor_created_at TIMESTAMPTZ,
-- $4 cursor_command_id UUID, $5 scan_limit INT
SELECT created_at, command_id
FROM commandbus.command
WHERE created_at >= coalesce($1::timestamptz, '-infinity')
  AND created_at <= coalesce($2::timestamptz, 'infinity')
  AND created_at <= coalesce($3::timestamptz, 'infinity')
  AND (created_at < coalesce($3::timestamptz, 'infinity')
       OR command_id < coalesce($4::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
ORDER BY created_at DESC, command_id DESC
OFFSET $5::int - 1
LIMIT 1

-- name: monitor_command_by_id
-- A command by id among the given domains (a probe of uq_command_domain_cmdid per domain).
-- $1 command_id UUID, $2 domains TEXT[]
SELECT domain, command_id, command_type, status, attempts, max_attempts, msg_id, correlation_id,
       nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code, last_error_msg,
       created_at, updated_at, batch_id, result
FROM commandbus.command
WHERE command_id = $1::uuid AND domain = ANY ($2::text[])
ORDER BY domain

-- name: monitor_command_message
-- A command's queue message (its payload), from the queue or its archive; NULL when neither
-- holds it any more.
-- $1 domain TEXT, $2 msg_id BIGINT
SELECT commandbus.command_message_v1($1::text, $2::bigint) AS message

-- name: monitor_process_domains
-- The domains that have processes, in name order (a skip scan of the primary key).
-- No parameters.
WITH RECURSIVE d AS (
    (SELECT domain FROM commandbus.process ORDER BY domain LIMIT 1)
    UNION ALL
    SELECT (SELECT p.domain FROM commandbus.process p WHERE p.domain > d.domain ORDER BY p.domain LIMIT 1)
    FROM d WHERE d.domain IS NOT NULL
)
SELECT domain FROM d WHERE domain IS NOT NULL

-- name: monitor_list_processes
-- One page of a domain's processes (of one status, or all when NULL), newest first, after a
-- keyset cursor (created_at, process_id).
-- $1 domain TEXT, $2 status TEXT, $3 cursor_created_at TIMESTAMPTZ, $4 cursor_process_id UUID,
-- $5 limit INT
SELECT domain, process_id, process_type, status, current_step, state, error_code, error_message,
       created_at, updated_at, completed_at, batch_id
FROM commandbus.process
WHERE domain = $1::text
  AND ($2::text IS NULL OR status = $2::text)
  AND created_at <= coalesce($3::timestamptz, 'infinity')
  AND (created_at < coalesce($3::timestamptz, 'infinity')
       OR process_id < coalesce($4::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
ORDER BY created_at DESC, process_id DESC
LIMIT $5::int
