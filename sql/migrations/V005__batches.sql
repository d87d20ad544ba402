-- V005: batches. A batch row and its commands are written by one call (create_batch_v1), so a
-- batch never exists without its commands or the other way round. Counters and completion move
-- only in apply_batch_delta_v1 (V003); this file adds nothing to the hot path.
-- SQLSTATEs (class 'CB', continuing V002 and V004):
--   CB003 invalid input (DETAIL = the offending value: 'commands', the batch type, ...),
--   CB007 a batch with this batch_id already exists in the domain (DETAIL = the batch_id).

-- Creates a batch (status PENDING; total_count = number of commands, counted by send_commands_v1) and sends its commands
-- through send_commands_v1 (V002) with the same arrays, in the caller's transaction: queue
-- messages, command rows and SENT audit rows. Any error (duplicate batch_id CB007, duplicate
-- command_id CB001, ...) rolls back the batch row with everything else.
CREATE OR REPLACE FUNCTION commandbus.create_batch_v1(
    p_domain TEXT,
    p_batch_id UUID,
    p_batch_type TEXT,
    p_name TEXT,
    p_custom_data JSONB,
    p_command_ids UUID[],
    p_command_types TEXT[],
    p_data JSONB[],
    p_correlation_ids UUID[],
    p_reply_tos TEXT[],
    p_max_attempts INT[]
) RETURNS TABLE (command_id UUID, msg_id BIGINT, correlation_id UUID)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_n INT := coalesce(array_length(p_command_ids, 1), 0);
BEGIN
    IF v_n = 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = 'a batch needs at least one command', DETAIL = 'commands';
    END IF;
    IF coalesce(array_length(p_command_types, 1), 0) <> v_n
       OR coalesce(array_length(p_data, 1), 0) <> v_n
       OR coalesce(array_length(p_correlation_ids, 1), 0) <> v_n
       OR coalesce(array_length(p_reply_tos, 1), 0) <> v_n
       OR coalesce(array_length(p_max_attempts, 1), 0) <> v_n THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = 'the command arrays of a batch must have the same length', DETAIL = 'commands';
    END IF;
    IF p_batch_id IS NULL OR p_batch_type IS NULL OR p_batch_type NOT IN ('COMMAND', 'PROCESS') THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('invalid batch id %s or batch type %L', p_batch_id, p_batch_type),
            DETAIL = coalesce(p_batch_type, 'NULL');
    END IF;

    -- ON CONFLICT waits for a concurrent creator of the same id and then reports the duplicate.
    INSERT INTO commandbus.batch AS b (domain, batch_id, batch_type, name, custom_data, status, total_count)
    -- total_count starts at 0: send_commands_v1 counts every command sent into a batch.
    VALUES (p_domain, p_batch_id, p_batch_type, p_name, p_custom_data, 'PENDING', 0)
    ON CONFLICT (domain, batch_id) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB007',
            MESSAGE = format('batch %s already exists in domain %s', p_batch_id, p_domain),
            DETAIL = p_batch_id::text;
    END IF;

    RETURN QUERY
    SELECT s.command_id, s.msg_id, s.correlation_id
    FROM commandbus.send_commands_v1(
        p_domain, p_command_ids, p_command_types, p_data, p_correlation_ids, p_reply_tos,
        p_max_attempts, array_fill(p_batch_id, ARRAY[v_n])) AS s;
END $$;

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
