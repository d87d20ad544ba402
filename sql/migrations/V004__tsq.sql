-- V004: the troubleshooting queue (TSQ): listing helpers and operator retry / cancel / complete,
-- one command at a time or in bulk chunks.
-- Every operator action is one call in one transaction: it locks the command rows FOR UPDATE and
-- acts only on rows still IN_TROUBLESHOOTING_QUEUE, so when two operators act on one command at
-- once exactly one succeeds and the other gets CB004. Batch counters move only through
-- apply_batch_delta_v1 (V003), one call per batch, in batch_id order (no lock-order deadlock
-- between two bulk calls touching the same batches).
-- SQLSTATEs (class 'CB', continuing V002):
--   CB004 the command is not in the TSQ (DETAIL = its current status),
--   CB005 no such command in the domain (DETAIL = the command_id),
--   CB006 the command cannot be retried: its archived queue message is missing or is not a
--         JSON object (DETAIL = the command_id).

-- The archived queue message of a domain's command (PGMQ archive `pgmq.a_{domain}__commands`,
-- looked up by its primary key msg_id), or NULL when the archive or the row does not exist.
-- The table name depends on the domain, hence dynamic SQL with %I quoting.
CREATE OR REPLACE FUNCTION commandbus.tsq_archived_message_v1(p_domain TEXT, p_msg_id BIGINT)
RETURNS JSONB
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_table TEXT := 'a_' || p_domain || '__commands';
    v_msg JSONB;
BEGIN
    IF p_msg_id IS NULL OR to_regclass(format('pgmq.%I', v_table)) IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT message FROM pgmq.%I WHERE msg_id = $1', v_table)
        INTO v_msg USING p_msg_id;
    RETURN v_msg;
END $$;

-- Locks one command row and checks that it is in the TSQ (CB005 / CB004 otherwise).
CREATE OR REPLACE FUNCTION commandbus.tsq_lock_v1(p_domain TEXT, p_command_id UUID)
RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    v_status TEXT;
BEGIN
    SELECT c.status INTO v_status
    FROM commandbus.command c
    WHERE c.domain = p_domain AND c.command_id = p_command_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB005',
            MESSAGE = format('Command %s not found in domain %s', p_command_id, p_domain),
            DETAIL = p_command_id::text;
    END IF;
    IF v_status <> 'IN_TROUBLESHOOTING_QUEUE' THEN
        RAISE EXCEPTION USING ERRCODE = 'CB004',
            MESSAGE = format('Command %s is not in troubleshooting queue (status: %s)',
                             p_command_id, v_status),
            DETAIL = v_status;
    END IF;
END $$;

-- Re-sends the archived messages of TSQ commands the caller has locked: status PENDING,
-- attempts 0, msg_id = the new message (nothing else is cleared), OPERATOR_RETRY audit rows,
-- batch in_troubleshooting - 1, NOTIFY for the workers. The message keeps every archived key;
-- its command_id is set to the row's, so a retried malformed message is claimable. Commands
-- without a usable archived message are skipped (not returned).
CREATE OR REPLACE FUNCTION commandbus.tsq_retry_locked_v1(
    p_domain TEXT, p_command_ids UUID[], p_operator TEXT
) RETURNS TABLE (command_id UUID, msg_id BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_ids UUID[];
    v_msgs JSONB[];
    v_batches UUID[];
    v_new BIGINT[];
    r RECORD;
BEGIN
    SELECT array_agg(c.command_id ORDER BY c.command_id),
           array_agg(m.msg || jsonb_build_object('command_id', c.command_id) ORDER BY c.command_id),
           array_agg(c.batch_id) FILTER (WHERE c.batch_id IS NOT NULL)
    INTO v_ids, v_msgs, v_batches
    FROM commandbus.command c
    CROSS JOIN LATERAL (SELECT commandbus.tsq_archived_message_v1(p_domain, c.msg_id) AS msg) m
    WHERE c.domain = p_domain AND c.command_id = ANY (p_command_ids)
      AND c.status = 'IN_TROUBLESHOOTING_QUEUE'
      AND jsonb_typeof(m.msg) = 'object';
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    PERFORM commandbus.ensure_queue_v1(v_queue);
    SELECT array_agg(s.id ORDER BY s.o) INTO v_new
    FROM pgmq.send_batch(v_queue, v_msgs) WITH ORDINALITY AS s(id, o);

    WITH upd AS (
        UPDATE commandbus.command c
        SET status = 'PENDING', attempts = 0, msg_id = t.mid, updated_at = now()
        FROM unnest(v_ids, v_new) AS t(cid, mid)
        WHERE c.domain = p_domain AND c.command_id = ANY (v_ids) AND c.command_id = t.cid
        RETURNING c.command_id, c.msg_id
    )
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT p_domain, u.command_id, 'OPERATOR_RETRY',
           jsonb_build_object('operator', p_operator, 'new_msg_id', u.msg_id)
    FROM upd u;

    -- A retry never completes a batch: the command is back in flight.
    FOR r IN SELECT b.bid, count(*)::int AS n FROM unnest(v_batches) AS b(bid)
             GROUP BY b.bid ORDER BY b.bid LOOP
        PERFORM commandbus.apply_batch_delta_v1(p_domain, r.bid, 0, 0, 0, -r.n);
    END LOOP;

    PERFORM pg_notify('pgmq_notify_' || v_queue, '');
    RETURN QUERY SELECT t.cid, t.mid FROM unnest(v_ids, v_new) AS t(cid, mid);
END $$;

-- Cancels TSQ commands the caller has locked: status CANCELED, a CANCELED reply where the
-- command has a reply queue, OPERATOR_CANCEL audit rows, batch canceled + 1 and
-- in_troubleshooting - 1. Returns how many commands were canceled.
CREATE OR REPLACE FUNCTION commandbus.tsq_cancel_locked_v1(
    p_domain TEXT, p_command_ids UUID[], p_reason TEXT, p_operator TEXT
) RETURNS INT
LANGUAGE plpgsql AS $$
DECLARE
    v_n INT;
    v_batches UUID[];
    v_reply_q TEXT[];
    v_reply_msg JSONB[];
    r RECORD;
BEGIN
    WITH upd AS (
        UPDATE commandbus.command c
        SET status = 'CANCELED', updated_at = now()
        WHERE c.domain = p_domain AND c.command_id = ANY (p_command_ids)
          AND c.status = 'IN_TROUBLESHOOTING_QUEUE'
        RETURNING c.command_id, c.correlation_id, c.reply_queue, c.batch_id
    ), aud AS (
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        SELECT p_domain, u.command_id, 'OPERATOR_CANCEL', jsonb_build_object(
                   'operator', p_operator, 'reason', p_reason,
                   'reply_to', nullif(u.reply_queue, ''))
        FROM upd u
    )
    SELECT count(*)::int,
           array_agg(u.batch_id) FILTER (WHERE u.batch_id IS NOT NULL),
           array_agg(u.reply_queue ORDER BY u.command_id) FILTER (WHERE u.reply_queue <> ''),
           array_agg(jsonb_build_object(
                'command_id', u.command_id, 'correlation_id', u.correlation_id,
                'outcome', 'CANCELED', 'reason', p_reason) ORDER BY u.command_id)
               FILTER (WHERE u.reply_queue <> '')
    INTO v_n, v_batches, v_reply_q, v_reply_msg
    FROM upd u;

    IF v_reply_q IS NOT NULL THEN
        FOR r IN SELECT t.q, array_agg(t.msg ORDER BY t.o) AS msgs
                 FROM unnest(v_reply_q, v_reply_msg) WITH ORDINALITY AS t(q, msg, o)
                 GROUP BY t.q ORDER BY t.q LOOP
            PERFORM commandbus.ensure_queue_v1(r.q);
            PERFORM pgmq.send_batch(r.q, r.msgs);
        END LOOP;
    END IF;

    FOR r IN SELECT b.bid, count(*)::int AS n FROM unnest(v_batches) AS b(bid)
             GROUP BY b.bid ORDER BY b.bid LOOP
        PERFORM commandbus.apply_batch_delta_v1(p_domain, r.bid, 0, 0, r.n, -r.n);
    END LOOP;
    RETURN v_n;
END $$;

-- Operator retry of one TSQ command; returns the new msg_id (CB005 / CB004 / CB006).
CREATE OR REPLACE FUNCTION commandbus.tsq_retry_v1(
    p_domain TEXT, p_command_id UUID, p_operator TEXT
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    v_new BIGINT;
BEGIN
    PERFORM commandbus.tsq_lock_v1(p_domain, p_command_id);
    SELECT t.msg_id INTO v_new
    FROM commandbus.tsq_retry_locked_v1(p_domain, ARRAY[p_command_id], p_operator) t;
    IF v_new IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CB006',
            MESSAGE = format('Payload not found in archive for command %s', p_command_id),
            DETAIL = p_command_id::text;
    END IF;
    RETURN v_new;
END $$;

-- Operator cancel of one TSQ command (CB005 / CB004).
CREATE OR REPLACE FUNCTION commandbus.tsq_cancel_v1(
    p_domain TEXT, p_command_id UUID, p_reason TEXT, p_operator TEXT
) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM commandbus.tsq_lock_v1(p_domain, p_command_id);
    PERFORM commandbus.tsq_cancel_locked_v1(p_domain, ARRAY[p_command_id], p_reason, p_operator);
END $$;

-- Operator completion of one TSQ command: status COMPLETED with p_result stored, a SUCCESS
-- reply carrying it where the command has a reply queue, an OPERATOR_COMPLETE audit row,
-- batch completed + 1 and in_troubleshooting - 1 (CB005 / CB004).
CREATE OR REPLACE FUNCTION commandbus.tsq_complete_v1(
    p_domain TEXT, p_command_id UUID, p_result JSONB, p_operator TEXT
) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    v RECORD;
BEGIN
    PERFORM commandbus.tsq_lock_v1(p_domain, p_command_id);
    UPDATE commandbus.command c
    SET status = 'COMPLETED', result = p_result, updated_at = now()
    WHERE c.domain = p_domain AND c.command_id = p_command_id
    RETURNING c.correlation_id, c.reply_queue, c.batch_id INTO v;

    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    VALUES (p_domain, p_command_id, 'OPERATOR_COMPLETE', jsonb_build_object(
        'operator', p_operator, 'has_result_data', p_result IS NOT NULL,
        'reply_to', nullif(v.reply_queue, '')));

    IF v.reply_queue <> '' THEN
        PERFORM commandbus.ensure_queue_v1(v.reply_queue);
        PERFORM pgmq.send(v.reply_queue, jsonb_build_object(
            'command_id', p_command_id, 'correlation_id', v.correlation_id,
            'outcome', 'SUCCESS', 'result', p_result));
    END IF;
    PERFORM commandbus.apply_batch_delta_v1(p_domain, v.batch_id, 1, 0, 0, -1);
END $$;

-- One chunk of a bulk retry: locks and retries up to p_limit TSQ commands of the domain
-- (optionally of one type) with command_id > p_after that were in the TSQ at the cutoff
-- (p_cutoff, or now() on the first call). Call again with the returned cutoff and
-- last_command_id until examined = 0. affected counts the commands retried (those without a
-- usable archived message are examined but skipped).
CREATE OR REPLACE FUNCTION commandbus.tsq_retry_all_v1(
    p_domain TEXT, p_command_type TEXT, p_operator TEXT, p_limit INT,
    p_cutoff TIMESTAMPTZ, p_after UUID
) RETURNS TABLE (examined INT, affected INT, cutoff TIMESTAMPTZ, last_command_id UUID)
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff TIMESTAMPTZ := coalesce(p_cutoff, now());
    v_ids UUID[];
    v_n INT;
BEGIN
    v_ids := commandbus.tsq_lock_page_v1(p_domain, p_command_type, p_limit, v_cutoff, p_after);
    IF v_ids IS NULL THEN
        RETURN QUERY SELECT 0, 0, v_cutoff, p_after;
        RETURN;
    END IF;
    SELECT count(*)::int INTO v_n FROM commandbus.tsq_retry_locked_v1(p_domain, v_ids, p_operator);
    RETURN QUERY SELECT array_length(v_ids, 1), v_n, v_cutoff, v_ids[array_length(v_ids, 1)];
END $$;

-- One chunk of a bulk cancel; the same paging contract as tsq_retry_all_v1.
CREATE OR REPLACE FUNCTION commandbus.tsq_cancel_all_v1(
    p_domain TEXT, p_reason TEXT, p_command_type TEXT, p_operator TEXT, p_limit INT,
    p_cutoff TIMESTAMPTZ, p_after UUID
) RETURNS TABLE (examined INT, affected INT, cutoff TIMESTAMPTZ, last_command_id UUID)
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff TIMESTAMPTZ := coalesce(p_cutoff, now());
    v_ids UUID[];
    v_n INT;
BEGIN
    v_ids := commandbus.tsq_lock_page_v1(p_domain, p_command_type, p_limit, v_cutoff, p_after);
    IF v_ids IS NULL THEN
        RETURN QUERY SELECT 0, 0, v_cutoff, p_after;
        RETURN;
    END IF;
    v_n := commandbus.tsq_cancel_locked_v1(p_domain, v_ids, p_reason, p_operator);
    RETURN QUERY SELECT array_length(v_ids, 1), v_n, v_cutoff, v_ids[array_length(v_ids, 1)];
END $$;

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (4, 'tsq') ON CONFLICT (version) DO NOTHING;
