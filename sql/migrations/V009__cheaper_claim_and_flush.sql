-- V009: a cheaper claim and flush (benches/README.md, "What changed", steps 9 and 10).
--
-- 1. The claim looks each command row up once. V007 looked every claimed message's row up
--    twice: once to sort out orphans (no command row) and poison (attempts used up) before the
--    claim, once to update it; the first lookup found nothing in normal operation and was ~8% of
--    a claim. Now the UPDATE itself leaves out a command whose attempts are used up, and only when
--    it claimed fewer commands than it read messages (an orphan, poison or stale message among
--    them) are those messages' rows looked up again to tell them apart, as before. Results, audit
--    rows, TSQ moves and batch counters are V007's.
--    The UPDATE runs without nested loops: plpgsql's generic plan (from the sixth call on) chose
--    one over the unnested messages, with the index probe of each row also checking
--    `command_id = ANY (all ids)`: one pass over the id array per message, which cost more than
--    the lookup saved. The queue read keeps nested loops (V007).
-- 2. The claim in two steps. A claim locks the queue rows it reads (FOR UPDATE SKIP LOCKED)
--    until it commits, and every other claim that starts meanwhile walks past those rows one by
--    one, trying each lock. In one transaction the locks were held while the claim also updated
--    the command rows and wrote the RECEIVED audit rows, three quarters of its time: with 4
--    worker processes (8 claims in flight) each claim of 512 skipped ~2,000 locked rows
--    (auto_explain, PostgreSQL 15), with one process ~280. The engine now claims in two
--    transactions on one connection (~470 skipped rows per claim with 4 processes):
--      a. lease_messages_v1: the vt-ordered read, committed at once; it returns only the
--         msg_ids. That commit need not be flushed to disk (synchronous_commit = off for that
--         transaction): lost in a crash, the lease never happened and the messages are visible
--         again, which is what a crash does to a lease anyway. The second step's commit is
--         flushed, and the WAL is flushed in order, so whatever a handler sees was leased
--         durably.
--      b. claim_leased_v1: the claim of item 1 for those msg_ids (their messages read by primary
--         key).
--    Between the two, the messages are leased and no command has changed: if the second step
--    never runs (the worker died, the connection broke), the leases expire and the messages come
--    back with their attempts untouched, as no handler ran. claim_commands_v1 runs both steps
--    in one transaction for callers of the older protocol.
-- 3. complete_commands_v1: the flush of outcomes that are all SUCCESS (the engine's common case)
--    without the failure columns, the CASEs and the seven audit kinds of finish_commands_v1:
--    -19% database CPU per flushed command. The engine takes it only when every outcome of a
--    flush is SUCCESS; it writes what finish_commands_v1 writes for SUCCESS
--    (test_all_success_flush_writes_what_the_general_flush_writes).

-- Step 1 of a claim: leases up to p_qty visible messages of a domain's queue for p_vt seconds
-- (pgmq.read's statement in vt order, V007) and returns their msg_ids. With p_async_commit the
-- caller's transaction commits without waiting for the disk (see the top of this file).
CREATE OR REPLACE FUNCTION commandbus.lease_messages_v1(
    p_domain TEXT, p_vt INT, p_qty INT, p_async_commit BOOLEAN
)
RETURNS BIGINT[]
LANGUAGE plpgsql
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_ids BIGINT[];
BEGIN
    IF p_async_commit THEN
        -- Transaction-local (no SET clause for it on this function, so it lasts to the commit):
        -- only for a caller that commits the lease on its own (the engine's first step).
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    EXECUTE format(
        'WITH cte AS ('
        '    SELECT msg_id FROM pgmq.%1$I WHERE vt <= clock_timestamp()'
        '    ORDER BY vt LIMIT $1 FOR UPDATE SKIP LOCKED'
        '), upd AS ('
        '    UPDATE pgmq.%1$I m SET vt = clock_timestamp() + make_interval(secs => $2),'
        '                          read_ct = m.read_ct + 1'
        '    FROM cte WHERE m.msg_id = cte.msg_id'
        '    RETURNING m.msg_id'
        ') SELECT array_agg(msg_id ORDER BY msg_id) FROM upd',
        'q_' || p_domain || '__commands')
    INTO v_ids
    USING p_qty, p_vt;
    RETURN v_ids;
END $$;

-- Step 2 of a claim: claims the commands of messages this caller leased with
-- lease_messages_v1: command rows IN_PROGRESS with attempts + 1, RECEIVED audit rows, batches
-- started; orphans, poison and stale messages sorted out (V007's rules). The lease token of a
-- claimed command is (msg_id, attempt), as before.
CREATE OR REPLACE FUNCTION commandbus.claim_leased_v1(
    p_domain TEXT,
    p_msg_ids BIGINT[],
    p_default_max_attempts INT
) RETURNS TABLE (
    msg_id BIGINT, attempt INT, max_attempts INT, command_id UUID, command_type TEXT,
    data JSONB, correlation_id UUID, reply_to TEXT, batch_id UUID, created_at TIMESTAMPTZ
)
LANGUAGE plpgsql
-- Planner settings: see V007.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off SET jit = off
    SET enable_nestloop = on
AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_ids BIGINT[];
    v_msgs JSONB[];
    v_cid_all UUID[];
    v_cids UUID[];
    v_claimed BIGINT;
    v_left BIGINT[];
    v_orphans BIGINT[];
    v_poison BIGINT[];
    v_poison_cids UUID[];
    v_n BIGINT;
BEGIN
    -- The messages lease_messages_v1 leased to this caller (one that was deleted or archived
    -- since, by retention or an operator, is simply not there).
    EXECUTE format(
        'SELECT array_agg(q.msg_id ORDER BY q.msg_id), array_agg(q.message ORDER BY q.msg_id)'
        '  FROM pgmq.%I q WHERE q.msg_id = ANY ($1)',
        'q_' || v_queue)
    INTO v_ids, v_msgs
    USING p_msg_ids;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    -- v_cid_all[i] is message i's command_id, NULL where it has none or not a UUID (V007).
    BEGIN
        SELECT array_agg((m.msg->>'command_id')::uuid ORDER BY m.o) INTO v_cid_all
        FROM unnest(v_msgs) WITH ORDINALITY AS m(msg, o);
    EXCEPTION WHEN invalid_text_representation THEN
        SELECT array_agg(CASE WHEN (m.msg->>'command_id') ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                              THEN (m.msg->>'command_id')::uuid END ORDER BY m.o) INTO v_cid_all
        FROM unnest(v_msgs) WITH ORDINALITY AS m(msg, o);
    END;
    v_cids := array_remove(v_cid_all, NULL);

    -- The claim: a message whose command is PENDING or IN_PROGRESS under this msg_id, with an
    -- attempt left. Everything else (no command row, attempts used up, command terminal or
    -- msg_id superseded) is sorted out below.
    PERFORM set_config('enable_nestloop', 'off', true);
    RETURN QUERY
    WITH m AS (
        SELECT u.mid, u.msg, u.cid
        FROM unnest(v_ids, v_msgs, v_cid_all) AS u(mid, msg, cid)
    ), upd AS (
        UPDATE commandbus.command c
        SET attempts = c.attempts + 1, status = 'IN_PROGRESS', updated_at = now()
        FROM m
        WHERE c.domain = p_domain AND c.command_id = ANY (v_cids) AND c.command_id = m.cid AND c.msg_id = m.mid
          AND c.status IN ('PENDING', 'IN_PROGRESS')
          AND c.attempts < coalesce(c.max_attempts, p_default_max_attempts)
        RETURNING m.mid, c.attempts, coalesce(c.max_attempts, p_default_max_attempts) AS ma, c.command_id,
                  c.command_type, m.msg, c.correlation_id, c.reply_queue, c.batch_id, c.created_at
    ), aud AS (
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        SELECT p_domain, u.command_id, 'RECEIVED',
               jsonb_build_object('msg_id', u.mid, 'attempt', u.attempts, 'max_attempts', u.ma)
        FROM upd u
    ), bst AS (
        UPDATE commandbus.batch b
        SET status = 'IN_PROGRESS', started_at = now()
        WHERE b.domain = p_domain AND b.status = 'PENDING'
          AND b.batch_id IN (SELECT u.batch_id FROM upd u WHERE u.batch_id IS NOT NULL)
        RETURNING b.batch_id
    ), bsa AS (
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        SELECT p_domain, s.batch_id, 'BATCH_STARTED', jsonb_build_object('batch_id', s.batch_id)
        FROM bst s
    )
    SELECT u.mid, u.attempts, u.ma, u.command_id, u.command_type, coalesce(u.msg->'data', '{}'::jsonb),
           u.correlation_id, nullif(u.reply_queue, ''), u.batch_id, u.created_at
    FROM upd u
    ORDER BY u.mid;  -- queue order
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    IF v_claimed = cardinality(v_ids) THEN
        RETURN;  -- every message claimed: the common case
    END IF;
    PERFORM set_config('enable_nestloop', 'on', true);

    -- The messages left over. A row claimed above is IN_PROGRESS under its msg_id with
    -- updated_at = now(), this transaction's start; a row that only looked claimed that way
    -- (updated by a transaction that started in the same microsecond) would leave its message
    -- leased until its visibility timeout, then claimed or sorted out again: nothing is lost.
    SELECT array_agg(m.mid)
    INTO v_left
    FROM unnest(v_ids, v_cid_all) AS m(mid, cid)
    WHERE NOT EXISTS (
        SELECT 1 FROM commandbus.command x
        WHERE x.domain = p_domain AND x.command_id = m.cid AND x.msg_id = m.mid
          AND x.status = 'IN_PROGRESS' AND x.updated_at = now());

    SELECT array_agg(m.mid) FILTER (WHERE c.command_id IS NULL),
           array_agg(m.mid) FILTER (WHERE c.attempts + 1 > coalesce(c.max_attempts, p_default_max_attempts)),
           array_agg(c.command_id) FILTER (WHERE c.attempts + 1 > coalesce(c.max_attempts, p_default_max_attempts))
    INTO v_orphans, v_poison, v_poison_cids
    FROM unnest(v_ids, v_cid_all) AS m(mid, cid)
    LEFT JOIN (SELECT x.command_id, x.msg_id, x.attempts, x.max_attempts
               FROM commandbus.command x
               WHERE x.domain = p_domain AND x.command_id = ANY (v_cids)
                 AND x.status IN ('PENDING', 'IN_PROGRESS')) c
           ON c.command_id = m.cid AND c.msg_id = m.mid
    WHERE m.mid = ANY (v_left);

    IF v_orphans IS NOT NULL THEN
        WITH o AS (
            SELECT u.mid, u.msg, u.cid
            FROM unnest(v_ids, v_msgs, v_cid_all) AS u(mid, msg, cid)
            WHERE u.mid = ANY (v_orphans)
        ), ins AS (
            INSERT INTO commandbus.command AS c (
                domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts,
                last_error_type, last_error_code, last_error_msg)
            SELECT p_domain, v_queue, o.mid, coalesce(o.cid, gen_random_uuid()),
                   coalesce(nullif(o.msg->>'command_type', ''), 'UNKNOWN'),
                   'IN_TROUBLESHOOTING_QUEUE', 1, 1, 'PERMANENT', 'MALFORMED_MESSAGE',
                   CASE WHEN o.cid IS NULL THEN 'queue message has no valid command_id'
                        ELSE 'queue message has no command row' END
            FROM o
            WHERE o.cid IS NULL
               OR NOT EXISTS (SELECT 1 FROM commandbus.command x WHERE x.domain = p_domain AND x.command_id = o.cid)
            ON CONFLICT (domain, command_id) DO NOTHING
            RETURNING c.command_id, c.msg_id, c.last_error_msg
        )
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        SELECT p_domain, i.command_id, 'MOVED_TO_TSQ', jsonb_build_object(
                   'msg_id', i.msg_id, 'attempt', 1, 'reason', 'MALFORMED_MESSAGE',
                   'error_type', 'PERMANENT', 'error_code', 'MALFORMED_MESSAGE', 'error_msg', i.last_error_msg)
        FROM ins i;
        PERFORM pgmq.archive(v_queue, v_orphans);
    END IF;

    IF v_poison IS NOT NULL THEN
        WITH upd AS (
            UPDATE commandbus.command c
            SET attempts = c.attempts + 1,
                status = 'IN_TROUBLESHOOTING_QUEUE',
                last_error_type = 'TRANSIENT',
                last_error_code = 'EXHAUSTED',
                last_error_msg = format('delivered %s times without an outcome (max_attempts %s): '
                                        'the handler crashed its worker or outlived its lease',
                                        c.attempts + 1, coalesce(c.max_attempts, p_default_max_attempts)),
                updated_at = now()
            FROM unnest(v_poison_cids, v_poison) AS p(cid, mid)
            WHERE c.domain = p_domain AND c.command_id = ANY (v_poison_cids) AND c.command_id = p.cid AND c.msg_id = p.mid
            RETURNING c.command_id, c.msg_id, c.attempts, coalesce(c.max_attempts, p_default_max_attempts) AS ma,
                      c.batch_id, c.last_error_msg
        ), aud AS (
            INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
            SELECT p_domain, u.command_id, e.ev, e.details
            FROM upd u CROSS JOIN LATERAL (VALUES
                ('RETRY_EXHAUSTED', jsonb_build_object('msg_id', u.msg_id, 'attempt', u.attempts, 'max_attempts', u.ma)),
                ('MOVED_TO_TSQ', jsonb_build_object(
                    'msg_id', u.msg_id, 'attempt', u.attempts, 'max_attempts', u.ma, 'reason', 'EXHAUSTED',
                    'error_type', 'TRANSIENT', 'error_code', 'EXHAUSTED', 'error_msg', u.last_error_msg))
            ) AS e(ev, details)
        )
        SELECT count(commandbus.apply_batch_delta_v1(p_domain, x.batch_id, 0, 0, 0, x.n)) INTO v_n
        FROM (SELECT u.batch_id, count(*)::int AS n FROM upd u WHERE u.batch_id IS NOT NULL
              GROUP BY 1 ORDER BY 1) x;
        PERFORM pgmq.archive(v_queue, v_poison);
    END IF;
END $$;

-- The claim in one transaction, for callers of the older protocol: both steps, committed
-- together (and flushed, as the caller's commit is).
CREATE OR REPLACE FUNCTION commandbus.claim_commands_v1(
    p_domain TEXT,
    p_vt INT,
    p_qty INT,
    p_default_max_attempts INT
) RETURNS TABLE (
    msg_id BIGINT, attempt INT, max_attempts INT, command_id UUID, command_type TEXT,
    data JSONB, correlation_id UUID, reply_to TEXT, batch_id UUID, created_at TIMESTAMPTZ
)
LANGUAGE sql AS $$
    SELECT * FROM commandbus.claim_leased_v1(
        p_domain, commandbus.lease_messages_v1(p_domain, p_vt, p_qty, false), p_default_max_attempts)
$$;

-- The flush of a batch of outcomes that are all SUCCESS (the common case): what
-- finish_commands_v1 does for SUCCESS, without the other outcomes' columns and audit kinds.
CREATE OR REPLACE FUNCTION commandbus.complete_commands_v1(
    p_domain TEXT,
    p_command_ids UUID[],
    p_msg_ids BIGINT[],
    p_attempts INT[],
    p_results JSONB[]
) RETURNS TABLE (command_id UUID, status TEXT)
LANGUAGE plpgsql
-- Planner settings: see V007 (finish_commands_v1).
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET enable_nestloop = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_ids UUID[];
    v_delete BIGINT[];
    v_reply_q TEXT[];
    v_reply_msg JSONB[];
    v_batches BIGINT;
    r RECORD;
BEGIN
    WITH i AS (
        SELECT * FROM unnest(p_command_ids, p_msg_ids, p_attempts, p_results) AS i(cid, mid, att, result)
    ), upd AS (
        UPDATE commandbus.command c
        SET status = 'COMPLETED', result = i.result, updated_at = now()
        FROM i
        WHERE c.domain = p_domain AND c.command_id = ANY (p_command_ids) AND c.command_id = i.cid AND c.msg_id = i.mid AND c.attempts = i.att
          AND c.status = 'IN_PROGRESS'
        RETURNING c.command_id, i.mid, i.result, c.reply_queue, c.correlation_id, c.batch_id
    ), aud AS (
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        SELECT p_domain, u.command_id, 'COMPLETED', jsonb_build_object(
                   'msg_id', u.mid, 'reply_to', nullif(u.reply_queue, ''), 'has_result', u.result IS NOT NULL)
        FROM upd u
    ), bupd AS (
        SELECT commandbus.apply_batch_delta_v1(p_domain, x.batch_id, x.done, 0, 0, 0) AS done
        FROM (SELECT u.batch_id, count(*)::int AS done
              FROM upd u WHERE u.batch_id IS NOT NULL
              GROUP BY u.batch_id
              ORDER BY u.batch_id) x  -- batch rows locked in one order (V007)
    )
    SELECT array_agg(u.command_id), array_agg(u.mid),
           array_agg(u.reply_queue) FILTER (WHERE u.reply_queue <> ''),
           array_agg(jsonb_build_object(
                'command_id', u.command_id, 'correlation_id', u.correlation_id,
                'outcome', 'SUCCESS', 'result', u.result))
               FILTER (WHERE u.reply_queue <> ''),
           (SELECT count(*) FROM bupd)
    INTO v_ids, v_delete, v_reply_q, v_reply_msg, v_batches
    FROM upd u;

    IF v_delete IS NOT NULL THEN
        PERFORM pgmq.delete(v_queue, v_delete);
    END IF;
    IF v_reply_q IS NOT NULL THEN
        FOR r IN SELECT t.q, array_agg(t.msg ORDER BY t.o) AS msgs
                 FROM unnest(v_reply_q, v_reply_msg) WITH ORDINALITY AS t(q, msg, o) GROUP BY t.q LOOP
            PERFORM commandbus.ensure_queue_v1(r.q);
            PERFORM pgmq.send_batch(r.q, r.msgs);
        END LOOP;
    END IF;
    IF v_ids IS NOT NULL THEN
        RETURN QUERY SELECT t.id, 'COMPLETED'::text FROM unnest(v_ids) AS t(id);
    END IF;
END $$;

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (9, 'cheaper_claim_and_flush') ON CONFLICT (version) DO NOTHING;
