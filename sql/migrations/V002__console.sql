-- The read side of the operator console (python/commandbus/ops/monitor.py): what a dashboard
-- refreshing every second may ask without slowing the workers.
--
-- Nothing here adds an index to a table the hot path writes: the command table's claim and
-- flush stay heap-only (HOT) updates, the audit table's inserts write the same indexes as before.
--   * Counts of the terminal statuses are estimates: multivariate statistics on (domain, status)
--     give each pair's share of the table at the last ANALYZE (autovacuum keeps them fresh);
--     counting a million rows per refresh is what the console must not do.
--   * The queue's counts are exact up to a cap, read from the queue table's indexes.
--   * The TSQ is counted exactly through ix_command_tsq (partial index on the in_tsq flag).
--   * Recent throughput walks the audit table's primary key backwards from its newest row.

CREATE STATISTICS IF NOT EXISTS commandbus.st_command_domain_status (mcv)
    ON domain, status FROM commandbus.command;

-- One domain queue's live figures, each bounded: `depth` counts messages up to p_cap (beyond,
-- `depth_exact` is false and depth is the msg_id span, an upper bound read from the primary
-- key); `leased` counts messages invisible now (being handled, or waiting out a retry's
-- backoff) up to p_cap, through PGMQ's vt index; `oldest_visible` is the enqueue time of the
-- oldest message a worker could take now. NULLs when the queue does not exist.
CREATE OR REPLACE FUNCTION commandbus.queue_stats_v1(p_queue TEXT, p_cap INT)
RETURNS TABLE (depth BIGINT, depth_exact BOOLEAN, leased BIGINT, oldest_visible TIMESTAMPTZ)
LANGUAGE plpgsql STABLE
SET jit = off
AS $$
DECLARE
    v_table TEXT := 'q_' || p_queue;
BEGIN
    IF to_regclass(format('pgmq.%I', v_table)) IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, NULL::boolean, NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM pgmq.%I LIMIT $1) s', v_table)
        INTO depth USING p_cap + 1;
    depth_exact := depth <= p_cap;
    IF NOT depth_exact THEN
        EXECUTE format('SELECT coalesce(max(msg_id) - min(msg_id) + 1, 0) FROM pgmq.%I', v_table)
            INTO depth;
    END IF;
    EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM pgmq.%I WHERE vt > clock_timestamp() LIMIT $1) s',
                   v_table)
        INTO leased USING p_cap;
    EXECUTE format('SELECT enqueued_at FROM pgmq.%I WHERE vt <= clock_timestamp() ORDER BY msg_id LIMIT 1',
                   v_table)
        INTO oldest_visible;
    RETURN NEXT;
END $$;

INSERT INTO commandbus.schema_migrations (version, name) VALUES (2, 'console') ON CONFLICT (version) DO NOTHING;
