-- V003: the one place batch counters and batch completion are computed. The worker's flush
-- (one call per batch per flush) and every operator action call it.

-- Moves a batch's counters by the given deltas in one row update. When the batch becomes
-- complete (completed + failed + canceled = total and nothing in the TSQ), sets its final status
-- (COMPLETED, or COMPLETED_WITH_FAILURES when something failed or was canceled), writes a
-- BATCH_COMPLETED audit row and announces it with NOTIFY commandbus_batch '<domain>:<batch_id>'
-- (the process that registered on_complete listens). Returns TRUE only on that transition.
CREATE OR REPLACE FUNCTION commandbus.apply_batch_delta_v1(
    p_domain TEXT, p_batch_id UUID,
    p_completed INT, p_failed INT, p_canceled INT, p_in_troubleshooting INT
) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    v RECORD;
BEGIN
    IF p_batch_id IS NULL THEN
        RETURN FALSE;
    END IF;
    UPDATE commandbus.batch b
    SET completed_count = b.completed_count + p_completed,
        failed_count = b.failed_count + p_failed,
        canceled_count = b.canceled_count + p_canceled,
        in_troubleshooting_count = b.in_troubleshooting_count + p_in_troubleshooting,
        status = CASE
            WHEN b.completed_count + p_completed + b.failed_count + p_failed
                 + b.canceled_count + p_canceled >= b.total_count
                 AND b.in_troubleshooting_count + p_in_troubleshooting = 0
            THEN CASE WHEN b.failed_count + p_failed + b.canceled_count + p_canceled > 0
                      THEN 'COMPLETED_WITH_FAILURES' ELSE 'COMPLETED' END
            WHEN b.status = 'PENDING' THEN 'IN_PROGRESS'
            ELSE b.status END,
        started_at = coalesce(b.started_at, now()),
        updated_at = now()
    WHERE b.domain = p_domain AND b.batch_id = p_batch_id
    RETURNING b.* INTO v;
    IF NOT FOUND OR v.status NOT IN ('COMPLETED', 'COMPLETED_WITH_FAILURES') OR v.completed_at IS NOT NULL THEN
        RETURN FALSE;
    END IF;
    UPDATE commandbus.batch SET completed_at = now() WHERE domain = p_domain AND batch_id = p_batch_id;
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    VALUES (p_domain, p_batch_id, 'BATCH_COMPLETED', jsonb_build_object(
        'batch_id', p_batch_id, 'status', v.status, 'total_count', v.total_count,
        'completed_count', v.completed_count, 'failed_count', v.failed_count,
        'canceled_count', v.canceled_count));
    PERFORM pg_notify('commandbus_batch', p_domain || ':' || p_batch_id);
    RETURN TRUE;
END $$;

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (3, 'batch_counters') ON CONFLICT (version) DO NOTHING;
