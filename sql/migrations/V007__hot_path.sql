-- V007: the hot path, tuned with the throughput benchmark (benches/README.md).
--
-- 1. HOT updates of the command row. A command row is updated twice on its way (claim:
--    IN_PROGRESS, flush: COMPLETED...). While `status` or `updated_at` were indexed, every such
--    update wrote a new entry into all five indexes of the table; with no index on a column the
--    hot path changes, and free room on each page (fillfactor), PostgreSQL updates in place
--    (heap-only tuples) and touches no index: 18% less database CPU per command (claim +
--    finish measured alone, 50,000 commands). Replaced indexes:
--      ix_command_status_type, ix_command_status_created (status, ...): the TSQ reads go through
--        `in_tsq`, a stored generated column that only changes when a row enters or leaves the
--        TSQ, and the partial index ix_command_tsq (queries say `in_tsq AND status = ...`);
--        other status filters (query_commands) use ix_command_created and filter.
--      ix_command_updated (updated_at): retention walks ix_command_created instead (a row's
--        updated_at is never before its created_at, so created_at < cutoff finds them all).
--    Adding the column rewrites the table once (a lock for the time of the rewrite).
-- 2. claim_commands_v1 and finish_commands_v1 move here from V002, cheaper: one bulk UUID cast
--    per claim instead of two regular expressions per message, audit details built only for the
--    audit rows written (the flush built all seven kinds for every row), and the claim reads the
--    queue in vt order (the statement of pgmq.read, which walks past every leased message).
-- 3. Planner settings, measured with 100,000 queued commands and two worker processes:
--    * finish / extend / release: no nested loops. Their generic plans (plpgsql switches to one
--      after five calls) took unnest(array) for 10 rows and, with statistics from before the
--      claims began, `status = 'IN_PROGRESS'` for 1 row; the plan then put the command rows
--      outside a nested loop and re-read the whole input array once per row: 1,000,000 row
--      comparisons and ~800 ms for a flush of 1,000 instead of a few ms. With nested loops off
--      the join is a hash join whatever the estimates say (the LATERAL audit VALUES still nest:
--      the one way to run them). The claim keeps nested loops: pgmq.read's own UPDATE joins
--      its locked rows back to the queue table by index, which is a nested loop.
--    * claim / finish / extend / release: no JIT. PostgreSQL 15 prices a disabled plan node at
--      1e10, far above jit_above_cost, and JIT-compiled each flush (~400 ms per call); these
--      statements touch at most a few thousand rows and never gain from JIT.

DROP INDEX IF EXISTS commandbus.ix_command_status_type;
DROP INDEX IF EXISTS commandbus.ix_command_status_created;
DROP INDEX IF EXISTS commandbus.ix_command_updated;
ALTER TABLE commandbus.command
    ADD COLUMN IF NOT EXISTS in_tsq BOOLEAN
        GENERATED ALWAYS AS (status = 'IN_TROUBLESHOOTING_QUEUE') STORED;
CREATE INDEX IF NOT EXISTS ix_command_tsq ON commandbus.command (domain, command_id) WHERE in_tsq;
CREATE INDEX IF NOT EXISTS ix_command_created ON commandbus.command (created_at);
ALTER TABLE commandbus.command SET (fillfactor = 80);

-- Claims up to p_qty messages of a domain's queue for p_vt seconds (pgmq.read) and marks their
-- commands IN_PROGRESS with attempts + 1, writing RECEIVED audit rows and starting batches.
-- The lease token of a claimed command is (msg_id, attempt): finish, extend and release are
-- fenced by it, so a worker whose lease expired cannot apply an outcome.
-- Poison guard: a message redelivered beyond its max_attempts (its handler kept killing its
-- worker or outliving the lease) goes to the TSQ with reason EXHAUSTED instead of cycling.
-- Malformed messages (no usable command_id, or no command row) go to the TSQ with error code
-- MALFORMED_MESSAGE; stale messages (command terminal, or msg_id superseded) are archived.
CREATE OR REPLACE FUNCTION commandbus.claim_commands_v1(
    p_domain TEXT,
    p_vt INT,
    p_qty INT,
    p_default_max_attempts INT
) RETURNS TABLE (
    msg_id BIGINT, attempt INT, max_attempts INT, command_id UUID, command_type TEXT,
    data JSONB, correlation_id UUID, reply_to TEXT, batch_id UUID, created_at TIMESTAMPTZ
)
LANGUAGE plpgsql
-- Row lookups must be unique-index probes whatever the statistics say (right after a bulk
-- send the planner believed the table tiny and scanned a whole domain per claim: 10x slower).
-- Hash joins stay on: without them the input arrays were rescanned per row (a flush of 1,000
-- took 430 ms instead of 40 ms).
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_ids BIGINT[];
    v_msgs JSONB[];
    v_cid_all UUID[];
    v_orphans BIGINT[];
    v_poison BIGINT[];
    v_poison_cids UUID[];
    v_skip BIGINT[];
    v_cids UUID[];
    v_n BIGINT;
BEGIN
    -- Every lookup below has "command_id = ANY(array)" as an index condition: joined on
    -- unnest() alone, the planner (with the stale statistics of a freshly loaded table)
    -- scanned the whole domain once per message: 1.4 s for a claim of 128.
    -- pgmq.read's own statement, ordered by vt instead of msg_id. pgmq.read walks the queue in
    -- msg_id order from its head and skips, one by one, every message another claim holds
    -- (vt in the future): with 4 workers x 1,024 leases that was ~8,000 rows and ~50 ms per
    -- claim. In vt order the scan of the queue's vt index starts at the visible messages and
    -- never sees a leased one. A new message's vt is its send time, so the order is still the
    -- order of sending; a message waiting out a retry backoff comes when its backoff ends.
    -- (last_read_at is left alone: older PGMQ versions have no such column.)
    EXECUTE format(
        'WITH cte AS ('
        '    SELECT msg_id FROM pgmq.%1$I WHERE vt <= clock_timestamp()'
        '    ORDER BY vt LIMIT $1 FOR UPDATE SKIP LOCKED'
        '), upd AS ('
        '    UPDATE pgmq.%1$I m SET vt = clock_timestamp() + make_interval(secs => $2),'
        '                          read_ct = m.read_ct + 1'
        '    FROM cte WHERE m.msg_id = cte.msg_id'
        '    RETURNING m.msg_id, m.message'
        ') SELECT array_agg(msg_id ORDER BY msg_id), array_agg(message ORDER BY msg_id) FROM upd',
        'q_' || v_queue)
    INTO v_ids, v_msgs
    USING p_qty, p_vt;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    -- v_cid_all[i] is message i's command_id, NULL where it has none or not a UUID. Casting
    -- all at once is the common case; the regex (two of them per message cost 8% of the
    -- database's time) runs only when some message is malformed and the cast failed.
    BEGIN
        SELECT array_agg((m.msg->>'command_id')::uuid ORDER BY m.o) INTO v_cid_all
        FROM unnest(v_msgs) WITH ORDINALITY AS m(msg, o);
    EXCEPTION WHEN invalid_text_representation THEN
        SELECT array_agg(CASE WHEN (m.msg->>'command_id') ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                              THEN (m.msg->>'command_id')::uuid END ORDER BY m.o) INTO v_cid_all
        FROM unnest(v_msgs) WITH ORDINALITY AS m(msg, o);
    END;
    v_cids := array_remove(v_cid_all, NULL);

    SELECT array_agg(m.mid) FILTER (WHERE c.command_id IS NULL),
           array_agg(m.mid) FILTER (WHERE c.attempts + 1 > coalesce(c.max_attempts, p_default_max_attempts)),
           array_agg(c.command_id) FILTER (WHERE c.attempts + 1 > coalesce(c.max_attempts, p_default_max_attempts))
    INTO v_orphans, v_poison, v_poison_cids
    FROM unnest(v_ids, v_cid_all) AS m(mid, cid)
    LEFT JOIN (SELECT x.command_id, x.msg_id, x.attempts, x.max_attempts
               FROM commandbus.command x
               WHERE x.domain = p_domain AND x.command_id = ANY (v_cids)
                 AND x.status IN ('PENDING', 'IN_PROGRESS')) c
           ON c.command_id = m.cid AND c.msg_id = m.mid;

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

    v_skip := coalesce(v_orphans, '{}') || coalesce(v_poison, '{}');
    RETURN QUERY
    WITH m AS (
        SELECT u.mid, u.msg, u.cid
        FROM unnest(v_ids, v_msgs, v_cid_all) AS u(mid, msg, cid)
        WHERE u.mid <> ALL (v_skip)
    ), upd AS (
        UPDATE commandbus.command c
        SET attempts = c.attempts + 1, status = 'IN_PROGRESS', updated_at = now()
        FROM m
        WHERE c.domain = p_domain AND c.command_id = ANY (v_cids) AND c.command_id = m.cid AND c.msg_id = m.mid
          AND c.status IN ('PENDING', 'IN_PROGRESS')
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
END $$;

-- Applies handler outcomes of one domain in one call (the worker's flush). Outcome codes:
-- SUCCESS -> COMPLETED (result stored, message deleted, SUCCESS reply);
-- TRANSIENT -> retry after the backoff (message visibility pushed forward), or the TSQ with
--   reason EXHAUSTED once the command's own max_attempts is used up;
-- PERMANENT -> the TSQ at once; BUSINESS_RULE -> FAILED with a FAILED reply.
-- Fenced: a row applies only while the command is IN_PROGRESS under the same (msg_id, attempt)
-- lease; a late outcome from an expired lease changes nothing and is not returned.
-- Batch counters move in one row update per batch per call (apply_batch_delta_v1, V003).
CREATE OR REPLACE FUNCTION commandbus.finish_commands_v1(
    p_domain TEXT,
    p_command_ids UUID[],
    p_msg_ids BIGINT[],
    p_attempts INT[],
    p_outcomes TEXT[],
    p_results JSONB[],
    p_error_types TEXT[],
    p_error_codes TEXT[],
    p_error_msgs TEXT[],
    p_error_details JSONB[],
    p_backoffs INT[],
    p_default_max_attempts INT
) RETURNS TABLE (command_id UUID, status TEXT)
LANGUAGE plpgsql
-- Row lookups must be unique-index probes whatever the statistics say (right after a bulk
-- send the planner believed the table tiny and scanned a whole domain per claim: 10x slower).
-- Hash joins stay on: without them the input arrays were rescanned per row (a flush of 1,000
-- took 430 ms instead of 40 ms). No nested loops and no JIT: see the top of this file.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET enable_nestloop = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_ids UUID[];
    v_status TEXT[];
    v_delete BIGINT[];
    v_archive BIGINT[];
    v_retry BIGINT[];
    v_backoff INT[];
    v_reply_q TEXT[];
    v_reply_msg JSONB[];
    v_batches BIGINT;
    r RECORD;
BEGIN
    WITH i AS (
        SELECT * FROM unnest(p_command_ids, p_msg_ids, p_attempts, p_outcomes, p_results, p_error_types,
                             p_error_codes, p_error_msgs, p_error_details, p_backoffs)
               AS i(cid, mid, att, outcome, result, etype, ecode, emsg, edetails, backoff)
    ), upd AS (
        UPDATE commandbus.command c
        SET status = CASE
                WHEN i.outcome = 'SUCCESS' THEN 'COMPLETED'
                WHEN i.outcome = 'BUSINESS_RULE' THEN 'FAILED'
                WHEN i.outcome = 'PERMANENT' THEN 'IN_TROUBLESHOOTING_QUEUE'
                WHEN i.att >= coalesce(c.max_attempts, p_default_max_attempts) THEN 'IN_TROUBLESHOOTING_QUEUE'
                -- Waiting out the backoff: PENDING also fences a repeated outcome for this lease.
                ELSE 'PENDING' END,
            result = CASE WHEN i.outcome = 'SUCCESS' THEN i.result ELSE c.result END,
            last_error_type = CASE WHEN i.outcome = 'SUCCESS' THEN c.last_error_type ELSE i.etype END,
            last_error_code = CASE WHEN i.outcome = 'SUCCESS' THEN c.last_error_code ELSE i.ecode END,
            last_error_msg = CASE WHEN i.outcome = 'SUCCESS' THEN c.last_error_msg ELSE i.emsg END,
            updated_at = now()
        FROM i
        WHERE c.domain = p_domain AND c.command_id = ANY (p_command_ids) AND c.command_id = i.cid AND c.msg_id = i.mid AND c.attempts = i.att
          AND c.status = 'IN_PROGRESS'
        RETURNING c.command_id, c.status, i.*, coalesce(c.max_attempts, p_default_max_attempts) AS ma,
                  c.reply_queue, c.correlation_id, c.batch_id
    ), aud AS (
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        -- Only the kept rows build their details (built for all seven, they cost 15% of the
        -- database's time in a flush).
        SELECT p_domain, u.command_id, e.ev, CASE e.k
                WHEN 1 THEN jsonb_build_object(
                    'msg_id', u.mid, 'reply_to', nullif(u.reply_queue, ''), 'has_result', u.result IS NOT NULL)
                WHEN 2 THEN jsonb_build_object(
                    'msg_id', u.mid, 'attempt', u.att, 'max_attempts', u.ma, 'error_type', u.etype,
                    'error_code', u.ecode, 'error_msg', u.emsg)
                WHEN 3 THEN jsonb_build_object(
                    'msg_id', u.mid, 'attempt', u.att, 'max_attempts', u.ma, 'backoff_seconds', u.backoff)
                WHEN 4 THEN jsonb_build_object(
                    'msg_id', u.mid, 'attempt', u.att, 'max_attempts', u.ma)
                WHEN 5 THEN jsonb_build_object(
                    'msg_id', u.mid, 'attempt', u.att, 'max_attempts', u.ma, 'reason', 'EXHAUSTED',
                    'error_type', u.etype, 'error_code', u.ecode, 'error_msg', u.emsg)
                WHEN 6 THEN jsonb_build_object(
                    'msg_id', u.mid, 'attempt', u.att, 'reason', 'PERMANENT', 'error_type', u.etype,
                    'error_code', u.ecode, 'error_msg', u.emsg, 'error_details', u.edetails)
                WHEN 7 THEN jsonb_build_object(
                    'msg_id', u.mid, 'attempt', u.att, 'error_code', u.ecode, 'error_msg', u.emsg,
                    'error_details', u.edetails)
               END
        FROM upd u CROSS JOIN LATERAL (VALUES
            (1, 'COMPLETED', u.outcome = 'SUCCESS'),
            (2, 'FAILED', u.outcome = 'TRANSIENT'),
            (3, 'RETRY_SCHEDULED', u.outcome = 'TRANSIENT' AND u.status = 'PENDING'),
            (4, 'RETRY_EXHAUSTED', u.outcome = 'TRANSIENT' AND u.status = 'IN_TROUBLESHOOTING_QUEUE'),
            (5, 'MOVED_TO_TSQ', u.outcome = 'TRANSIENT' AND u.status = 'IN_TROUBLESHOOTING_QUEUE'),
            (6, 'MOVED_TO_TSQ', u.outcome = 'PERMANENT'),
            (7, 'BUSINESS_RULE_FAILED', u.outcome = 'BUSINESS_RULE')
        ) AS e(k, ev, keep)
        WHERE e.keep
    ), bupd AS (
        -- One row update per batch per flush: the batch row is the hot spot under many workers.
        SELECT commandbus.apply_batch_delta_v1(p_domain, x.batch_id, x.done, x.failed, 0, x.tsq) AS done
        FROM (SELECT u.batch_id,
                     count(*) FILTER (WHERE u.status = 'COMPLETED')::int AS done,
                     count(*) FILTER (WHERE u.status = 'FAILED')::int AS failed,
                     count(*) FILTER (WHERE u.status = 'IN_TROUBLESHOOTING_QUEUE')::int AS tsq
              FROM upd u WHERE u.batch_id IS NOT NULL AND u.status <> 'PENDING'
              GROUP BY u.batch_id
              ORDER BY u.batch_id) x  -- batch rows locked in one order: no deadlock between flushes
    )
    SELECT array_agg(u.command_id), array_agg(u.status),
           array_agg(u.mid) FILTER (WHERE u.status = 'COMPLETED'),
           array_agg(u.mid) FILTER (WHERE u.status IN ('FAILED', 'IN_TROUBLESHOOTING_QUEUE')),
           array_agg(u.mid) FILTER (WHERE u.status = 'PENDING'),
           array_agg(coalesce(u.backoff, 0)) FILTER (WHERE u.status = 'PENDING'),
           array_agg(u.reply_queue) FILTER (WHERE u.reply_queue <> '' AND u.status IN ('COMPLETED', 'FAILED')),
           array_agg(jsonb_build_object(
                'command_id', u.command_id, 'correlation_id', u.correlation_id,
                'outcome', CASE WHEN u.status = 'COMPLETED' THEN 'SUCCESS' ELSE 'FAILED' END,
                'result', CASE WHEN u.status = 'COMPLETED' THEN u.result
                               ELSE jsonb_build_object('error_code', u.ecode, 'error_message', u.emsg,
                                                       'error_details', u.edetails) END))
               FILTER (WHERE u.reply_queue <> '' AND u.status IN ('COMPLETED', 'FAILED')),
           (SELECT count(*) FROM bupd)
    INTO v_ids, v_status, v_delete, v_archive, v_retry, v_backoff, v_reply_q, v_reply_msg, v_batches
    FROM upd u;

    IF v_delete IS NOT NULL THEN
        PERFORM pgmq.delete(v_queue, v_delete);
    END IF;
    IF v_archive IS NOT NULL THEN
        PERFORM pgmq.archive(v_queue, v_archive);
    END IF;
    IF v_retry IS NOT NULL THEN
        PERFORM pgmq.set_vt(v_queue, t.mid, t.backoff) FROM unnest(v_retry, v_backoff) AS t(mid, backoff);
    END IF;
    IF v_reply_q IS NOT NULL THEN
        FOR r IN SELECT t.q, array_agg(t.msg ORDER BY t.o) AS msgs
                 FROM unnest(v_reply_q, v_reply_msg) WITH ORDINALITY AS t(q, msg, o) GROUP BY t.q LOOP
            PERFORM commandbus.ensure_queue_v1(r.q);
            PERFORM pgmq.send_batch(r.q, r.msgs);
        END LOOP;
    END IF;

    IF v_ids IS NOT NULL THEN
        RETURN QUERY SELECT t.id, t.st FROM unnest(v_ids, v_status) AS t(id, st);
    END IF;
END $$;
-- Locks the next page of a domain's TSQ commands (keyset on command_id after p_after), only
-- those that were in the TSQ at p_cutoff: a command that a bulk retry sent back and that failed
-- again later is not picked up a second time by the same run. Returns the ids in order.
CREATE OR REPLACE FUNCTION commandbus.tsq_lock_page_v1(
    p_domain TEXT, p_command_type TEXT, p_limit INT, p_cutoff TIMESTAMPTZ, p_after UUID
) RETURNS UUID[]
LANGUAGE plpgsql AS $$
DECLARE
    v_ids UUID[];
BEGIN
    SELECT array_agg(x.command_id ORDER BY x.command_id) INTO v_ids
    FROM (
        SELECT c.command_id
        FROM commandbus.command c
        WHERE c.domain = p_domain
          AND c.in_tsq AND c.status = 'IN_TROUBLESHOOTING_QUEUE'  -- in_tsq: ix_command_tsq
          AND (p_command_type IS NULL OR c.command_type = p_command_type)
          AND c.updated_at <= p_cutoff
          AND (p_after IS NULL OR c.command_id > p_after)
        ORDER BY c.command_id
        LIMIT p_limit
        FOR UPDATE
    ) x;
    RETURN v_ids;
END $$;

-- Deletes up to p_chunk commands that are terminal (COMPLETED, FAILED, CANCELED) and whose
-- updated_at is older than p_cutoff (of one domain, or of all when p_domain is NULL), with:
--   * their audit rows and payload_archive rows;
--   * their queue messages: the archived ones (pgmq.a_<queue>) and any stale one left in the live
--     queue (pgmq.q_<queue>; a claim would otherwise take it for a malformed message). Messages
--     are found by the msg_ids of the command row and of its audit trail (`msg_id`, `new_msg_id`:
--     a retried command had several) and deleted only where the message's command_id matches.
-- When fewer than p_chunk commands were left, it also deletes up to p_chunk batches that are
-- complete (COMPLETED / COMPLETED_WITH_FAILURES) since before p_cutoff and have no command and no
-- process left, with their audit rows (BATCH_STARTED, BATCH_COMPLETED...).
-- PENDING, IN_PROGRESS and IN_TROUBLESHOOTING_QUEUE commands are never touched; rows locked by
-- another transaction are skipped (several pruners can run at once). Returns the counts deleted:
-- call it until commands and batches are both 0.
CREATE OR REPLACE FUNCTION commandbus.prune_v1(p_cutoff TIMESTAMPTZ, p_domain TEXT, p_chunk INT)
RETURNS TABLE (commands INT, audit_events INT, payloads INT, messages INT, batches INT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_domains TEXT[];
    v_ids UUID[];
    v_queues TEXT[];
    v_msg_ids BIGINT[];
    v_audit_domains TEXT[];
    v_audit_ids UUID[];
    v_audit_msg_ids BIGINT[];
    v_commands INT := 0;
    v_audit INT := 0;
    v_payloads INT := 0;
    v_messages INT := 0;
    v_batches INT := 0;
    v_n INT;
    r RECORD;
BEGIN
    IF p_cutoff IS NULL OR p_chunk IS NULL OR p_chunk < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('prune_v1: invalid cutoff %L or chunk %L', p_cutoff, p_chunk),
            DETAIL = coalesce(p_chunk::text, 'NULL');
    END IF;

    WITH victims AS (
        SELECT c.domain, c.command_id
        FROM commandbus.command c
        -- Walks ix_command_created: updated_at is never before created_at, so every victim
        -- has created_at < p_cutoff (there is no index on updated_at, see the top of V007).
        WHERE c.created_at < p_cutoff
          AND c.updated_at < p_cutoff
          AND c.status IN ('COMPLETED', 'FAILED', 'CANCELED')
          AND (p_domain IS NULL OR c.domain = p_domain)
        ORDER BY c.created_at
        LIMIT p_chunk
        FOR UPDATE SKIP LOCKED
    ), del AS (
        DELETE FROM commandbus.command c
        USING victims v
        WHERE c.domain = v.domain AND c.command_id = v.command_id
        RETURNING c.domain, c.command_id, c.queue_name, c.msg_id
    )
    SELECT count(*), array_agg(d.domain), array_agg(d.command_id), array_agg(d.queue_name),
           array_agg(d.msg_id)
    INTO v_commands, v_domains, v_ids, v_queues, v_msg_ids
    FROM del d;

    IF v_commands > 0 THEN
        WITH del AS (
            DELETE FROM commandbus.audit a
            USING unnest(v_domains, v_ids) AS t(dom, cid)
            WHERE a.command_id = ANY (v_ids) AND a.command_id = t.cid AND a.domain = t.dom
            RETURNING a.domain, a.command_id,
                      CASE WHEN jsonb_typeof(a.details_json->'msg_id') = 'number'
                           THEN (a.details_json->>'msg_id')::bigint
                           WHEN jsonb_typeof(a.details_json->'new_msg_id') = 'number'
                           THEN (a.details_json->>'new_msg_id')::bigint END AS mid
        )
        SELECT count(*),
               array_agg(d.domain) FILTER (WHERE d.mid IS NOT NULL),
               array_agg(d.command_id) FILTER (WHERE d.mid IS NOT NULL),
               array_agg(d.mid) FILTER (WHERE d.mid IS NOT NULL)
        INTO v_audit, v_audit_domains, v_audit_ids, v_audit_msg_ids
        FROM del d;

        WITH del AS (
            DELETE FROM commandbus.payload_archive p
            USING unnest(v_domains, v_ids) AS t(dom, cid)
            WHERE p.domain = t.dom AND p.command_id = t.cid
            RETURNING 1
        )
        SELECT count(*) INTO v_payloads FROM del;

        FOR r IN
            SELECT m.q, array_agg(m.mid) AS mids, array_agg(m.cid::text) AS cids
            FROM (
                SELECT v.q, v.mid, v.cid
                FROM unnest(v_queues, v_msg_ids, v_ids) AS v(q, mid, cid)
                WHERE v.mid IS NOT NULL
                UNION
                SELECT v.q, a.mid, a.cid
                FROM unnest(v_audit_domains, v_audit_ids, v_audit_msg_ids) AS a(dom, cid, mid)
                JOIN unnest(v_domains, v_ids, v_queues) AS v(dom, cid, q)
                  ON v.dom = a.dom AND v.cid = a.cid
            ) m
            WHERE EXISTS (SELECT 1 FROM pgmq.meta x WHERE x.queue_name = m.q)
            GROUP BY m.q
        LOOP
            EXECUTE format(
                'WITH d AS (DELETE FROM pgmq.%I m USING unnest($1::bigint[], $2::text[]) AS t(mid, cid)'
                ' WHERE m.msg_id = ANY ($1) AND m.msg_id = t.mid AND m.message->>''command_id'' = t.cid'
                ' RETURNING 1) SELECT count(*) FROM d', 'a_' || r.q)
            INTO v_n USING r.mids, r.cids;
            v_messages := v_messages + v_n;
            EXECUTE format(
                'WITH d AS (DELETE FROM pgmq.%I m USING unnest($1::bigint[], $2::text[]) AS t(mid, cid)'
                ' WHERE m.msg_id = ANY ($1) AND m.msg_id = t.mid AND m.message->>''command_id'' = t.cid'
                ' RETURNING 1) SELECT count(*) FROM d', 'q_' || r.q)
            INTO v_n USING r.mids, r.cids;
            v_messages := v_messages + v_n;
        END LOOP;
    END IF;

    IF v_commands < p_chunk THEN
        WITH victims AS (
            SELECT b.domain, b.batch_id
            FROM commandbus.batch b
            WHERE b.status IN ('COMPLETED', 'COMPLETED_WITH_FAILURES')
              AND coalesce(b.completed_at, b.updated_at, b.created_at) < p_cutoff
              AND (p_domain IS NULL OR b.domain = p_domain)
              AND NOT EXISTS (SELECT 1 FROM commandbus.command c
                              WHERE c.domain = b.domain AND c.batch_id = b.batch_id)
              AND NOT EXISTS (SELECT 1 FROM commandbus.process p
                              WHERE p.domain = b.domain AND p.batch_id = b.batch_id)
            LIMIT p_chunk
            FOR UPDATE SKIP LOCKED
        ), del AS (
            DELETE FROM commandbus.batch b
            USING victims v
            WHERE b.domain = v.domain AND b.batch_id = v.batch_id
            RETURNING b.domain, b.batch_id
        ), aud AS (
            DELETE FROM commandbus.audit a
            USING del d
            WHERE a.command_id = d.batch_id AND a.domain = d.domain
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM del), (SELECT count(*) FROM aud) INTO v_batches, v_n;
        v_audit := v_audit + v_n;
    END IF;

    RETURN QUERY SELECT v_commands, v_audit, v_payloads, v_messages, v_batches;
END $$;

ALTER FUNCTION commandbus.extend_leases_v1(TEXT, UUID[], BIGINT[], INT[], INT)
    SET enable_nestloop = off SET jit = off;
ALTER FUNCTION commandbus.release_commands_v1(TEXT, UUID[], BIGINT[], INT[])
    SET enable_nestloop = off SET jit = off;

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (7, 'hot_path') ON CONFLICT (version) DO NOTHING;
