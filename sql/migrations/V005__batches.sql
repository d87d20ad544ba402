-- V005: batches. A batch row and its commands are written by one call (create_batch_v1), so a
-- batch never exists without its commands or the other way round. Counters and completion move
-- only in apply_batch_delta_v1 (V003); this file adds nothing to the hot path.
-- SQLSTATEs (class 'CB', continuing V002 and V004):
--   CB003 invalid input (DETAIL = the offending value: 'commands', the batch type, ...),
--   CB007 a batch with this batch_id already exists in the domain (DETAIL = the batch_id).

-- create_batch_v1: see V008 (moved there with the send path; create_batch_v2 takes ready-made messages).

-- Recomputes a batch's counters from its command rows (repair tool; the predecessor's
-- sp_refresh_batch_stats) and applies the difference through apply_batch_delta_v1, so the
-- completion rule, BATCH_COMPLETED and NOTIFY stay in one place. The batch row is locked before
-- the commands are counted: a flush committing meanwhile cannot be counted twice.
-- Returns TRUE when this call completed the batch.
CREATE OR REPLACE FUNCTION commandbus.refresh_batch_stats_v1(p_domain TEXT, p_batch_id UUID)
RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    b RECORD;
    c RECORD;
BEGIN
    SELECT x.completed_count, x.failed_count, x.canceled_count, x.in_troubleshooting_count INTO b
    FROM commandbus.batch x
    WHERE x.domain = p_domain AND x.batch_id = p_batch_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN FALSE;
    END IF;
    SELECT count(*) FILTER (WHERE y.status = 'COMPLETED')::int AS completed,
           count(*) FILTER (WHERE y.status = 'FAILED')::int AS failed,
           count(*) FILTER (WHERE y.status = 'CANCELED')::int AS canceled,
           count(*) FILTER (WHERE y.status = 'IN_TROUBLESHOOTING_QUEUE')::int AS tsq
    INTO c
    FROM commandbus.command y
    WHERE y.domain = p_domain AND y.batch_id = p_batch_id;
    IF (c.completed, c.failed, c.canceled, c.tsq)
       = (b.completed_count, b.failed_count, b.canceled_count, b.in_troubleshooting_count) THEN
        RETURN FALSE;  -- nothing to repair (and a PENDING batch stays PENDING)
    END IF;
    RETURN commandbus.apply_batch_delta_v1(
        p_domain, p_batch_id,
        c.completed - b.completed_count, c.failed - b.failed_count,
        c.canceled - b.canceled_count, c.tsq - b.in_troubleshooting_count);
END $$;

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (5, 'batches') ON CONFLICT (version) DO NOTHING;
