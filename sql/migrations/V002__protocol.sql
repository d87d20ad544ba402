-- V002: the rcmd protocol as versioned SQL functions (send, claim, finish, lease, release).
-- Both the Rust engine and the pure-Python psycopg path call these, so any connection and any
-- driver writes identical rows. Each function works on arrays (one call per batch, set-based
-- statements inside), never one statement per command.
-- Errors raised here use SQLSTATE class 'CB' so drivers can map them to typed exceptions:
--   CB001 duplicate command_id (DETAIL = the id), CB002 unknown batch_id (DETAIL = the id),
--   CB003 invalid input (DETAIL = the offending value), CB008 batch already complete (DETAIL = id).
-- V004 adds CB004 not in the TSQ, CB005 unknown command (DETAIL = id), CB006 archived message
-- missing; V005 CB007 duplicate batch id (DETAIL = id). Both drivers map them in one place each
-- (python/commandbus/_errors.py, rust/py/src/errors.rs).

-- Creates a PGMQ queue on demand, idempotently and safely under concurrent first use.
CREATE OR REPLACE FUNCTION commandbus.ensure_queue_v1(p_queue TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        RETURN FALSE;
    END IF;
    IF p_queue !~ '^[a-z][a-z0-9_]*$' OR length(p_queue) > 47 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('invalid queue name %L', p_queue), DETAIL = p_queue;
    END IF;
    -- Two sessions creating the same queue at once would collide in the catalog: serialise.
    PERFORM pg_advisory_xact_lock(hashtext('commandbus.queue'), hashtext(p_queue));
    IF EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        RETURN FALSE;
    END IF;
    PERFORM pgmq.create(p_queue);
    RETURN TRUE;
END $$;

-- Sends commands of one domain: queue messages, command rows and SENT audit rows in the caller's
-- transaction. A duplicate command_id (in the input, or already stored, also under a concurrent
-- race) raises CB001 and the whole call rolls back, messages included.
CREATE OR REPLACE FUNCTION commandbus.send_commands_v1(
    p_domain TEXT,
    p_command_ids UUID[],
    p_command_types TEXT[],
    p_data JSONB[],
    p_correlation_ids UUID[],
    p_reply_tos TEXT[],
    p_max_attempts INT[],
    p_batch_ids UUID[]
) RETURNS TABLE (command_id UUID, msg_id BIGINT, correlation_id UUID)
LANGUAGE plpgsql
-- No planner flags here (unlike claim/finish): every lookup is a unique-index probe anyway,
-- and the flags' save/restore cost a fifth of a single send (305 -> 240 us in a loop).
AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_n INT := coalesce(array_length(p_command_ids, 1), 0);
    v_bad TEXT;
    v_inserted INT;
    v_corr UUID[];
    v_msg_ids BIGINT[];
BEGIN
    IF v_n = 0 THEN
        RETURN;
    END IF;
    PERFORM commandbus.ensure_queue_v1(v_queue);

    -- The checks below run only where they can find something: each statement of a plpgsql
    -- function costs ~15 us, which is a tenth of a single send.
    IF v_n > 1 THEN
        SELECT u::text INTO v_bad FROM unnest(p_command_ids) u GROUP BY u HAVING count(*) > 1 LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'CB001',
                MESSAGE = format('duplicate command_id %s in domain %s', v_bad, p_domain), DETAIL = v_bad;
        END IF;
    END IF;

    IF array_remove(p_batch_ids, NULL) <> '{}' THEN
        SELECT b::text INTO v_bad FROM unnest(p_batch_ids) b
        WHERE b IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM commandbus.batch x WHERE x.domain = p_domain AND x.batch_id = b)
        LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'CB002',
                MESSAGE = format('batch %s not found in domain %s', v_bad, p_domain), DETAIL = v_bad;
        END IF;
        -- Every command sent into a batch counts in its total (one row update per batch per call);
        -- a batch that already completed takes no more commands (CB008).
        WITH added AS (
            SELECT b AS batch_id, count(*)::int AS n FROM unnest(p_batch_ids) b
            WHERE b IS NOT NULL GROUP BY b ORDER BY b
        ), upd AS (
            UPDATE commandbus.batch x SET total_count = x.total_count + a.n, updated_at = now()
            FROM added a
            WHERE x.domain = p_domain AND x.batch_id = a.batch_id AND x.completed_at IS NULL
            RETURNING x.batch_id
        )
        SELECT a.batch_id::text INTO v_bad FROM added a
        WHERE a.batch_id NOT IN (SELECT u.batch_id FROM upd u) LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'CB008',
                MESSAGE = format('batch %s of domain %s is already complete', v_bad, p_domain), DETAIL = v_bad;
        END IF;
    END IF;

    IF array_remove(array_remove(p_reply_tos, NULL), '') <> '{}' THEN
        PERFORM commandbus.ensure_queue_v1(r)
        FROM (SELECT DISTINCT r FROM unnest(p_reply_tos) r WHERE r IS NOT NULL AND r <> '') q;
    END IF;

    SELECT array_agg(coalesce(c, gen_random_uuid()) ORDER BY o) INTO v_corr
    FROM unnest(p_correlation_ids) WITH ORDINALITY AS t(c, o);

    -- The queue message keeps the predecessor's keys.
    SELECT array_agg(s.id ORDER BY s.o) INTO v_msg_ids
    FROM pgmq.send_batch(
        v_queue,
        ARRAY(
            SELECT jsonb_strip_nulls(jsonb_build_object(
                       'domain', p_domain,
                       'command_type', t.ct,
                       'command_id', t.id,
                       'correlation_id', t.corr,
                       'reply_to', nullif(t.rt, '')))
                   || jsonb_build_object('data', coalesce(t.data, '{}'::jsonb))
            FROM unnest(p_command_ids, p_command_types, v_corr, p_reply_tos, p_data)
                 WITH ORDINALITY AS t(id, ct, corr, rt, data, o)
            ORDER BY t.o)
    ) WITH ORDINALITY AS s(id, o);

    WITH ins AS (
        INSERT INTO commandbus.command AS c (
            domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts,
            reply_queue, correlation_id, batch_id)
        SELECT p_domain, v_queue, t.mid, t.id, t.ct, 'PENDING', 0, t.ma, coalesce(t.rt, ''), t.corr, t.bid
        FROM unnest(p_command_ids, p_command_types, v_msg_ids, p_max_attempts, p_reply_tos, v_corr, p_batch_ids)
             AS t(id, ct, mid, ma, rt, corr, bid)
        ON CONFLICT (domain, command_id) DO NOTHING
        RETURNING c.command_id, c.command_type, c.msg_id, c.correlation_id, c.reply_queue, c.batch_id
    ), aud AS (
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        SELECT p_domain, i.command_id, 'SENT', jsonb_build_object(
                   'command_type', i.command_type,
                   'correlation_id', i.correlation_id,
                   'reply_to', nullif(i.reply_queue, ''),
                   'msg_id', i.msg_id,
                   'batch_id', i.batch_id)
        FROM ins i
    )
    SELECT count(*) INTO v_inserted FROM ins;

    IF v_inserted < v_n THEN
        SELECT u::text INTO v_bad FROM unnest(p_command_ids) u
        WHERE EXISTS (SELECT 1 FROM commandbus.command c
                      WHERE c.domain = p_domain AND c.command_id = u
                        AND coalesce(c.msg_id, -1) <> ALL (v_msg_ids))
        LIMIT 1;
        RAISE EXCEPTION USING ERRCODE = 'CB001',
            MESSAGE = format('duplicate command_id %s in domain %s', v_bad, p_domain), DETAIL = v_bad;
    END IF;

    -- Wake-up hint for listening workers (the predecessor's channel name); polling is the fallback.
    PERFORM pg_notify('pgmq_notify_' || v_queue, '');

    RETURN QUERY SELECT t.id, t.mid, t.corr FROM unnest(p_command_ids, v_msg_ids, v_corr) AS t(id, mid, corr);
END $$;

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
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_ids BIGINT[];
    v_msgs JSONB[];
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
    SELECT array_agg(r.msg_id), array_agg(r.message),
           array_agg((r.message->>'command_id')::uuid)
               FILTER (WHERE (r.message->>'command_id') ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$')
    INTO v_ids, v_msgs, v_cids
    FROM pgmq.read(v_queue, p_vt, p_qty) r;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    SELECT array_agg(m.mid) FILTER (WHERE c.command_id IS NULL),
           array_agg(m.mid) FILTER (WHERE c.attempts + 1 > coalesce(c.max_attempts, p_default_max_attempts)),
           array_agg(c.command_id) FILTER (WHERE c.attempts + 1 > coalesce(c.max_attempts, p_default_max_attempts))
    INTO v_orphans, v_poison, v_poison_cids
    FROM (
        SELECT u.mid, CASE WHEN (u.msg->>'command_id') ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                           THEN (u.msg->>'command_id')::uuid END AS cid
        FROM unnest(v_ids, v_msgs) AS u(mid, msg)
    ) m
    LEFT JOIN (SELECT x.command_id, x.msg_id, x.attempts, x.max_attempts
               FROM commandbus.command x
               WHERE x.domain = p_domain AND x.command_id = ANY (v_cids)
                 AND x.status IN ('PENDING', 'IN_PROGRESS')) c
           ON c.command_id = m.cid AND c.msg_id = m.mid;

    IF v_orphans IS NOT NULL THEN
        WITH o AS (
            SELECT u.mid, u.msg,
                   CASE WHEN (u.msg->>'command_id') ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                        THEN (u.msg->>'command_id')::uuid END AS cid
            FROM unnest(v_ids, v_msgs) AS u(mid, msg)
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
        SELECT u.mid, u.msg, (u.msg->>'command_id')::uuid AS cid
        FROM unnest(v_ids, v_msgs) AS u(mid, msg)
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
-- took 430 ms instead of 40 ms).
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
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
        SELECT p_domain, u.command_id, e.ev, e.details
        FROM upd u CROSS JOIN LATERAL (VALUES
            ('COMPLETED', u.outcome = 'SUCCESS', jsonb_build_object(
                'msg_id', u.mid, 'reply_to', nullif(u.reply_queue, ''), 'has_result', u.result IS NOT NULL)),
            ('FAILED', u.outcome = 'TRANSIENT', jsonb_build_object(
                'msg_id', u.mid, 'attempt', u.att, 'max_attempts', u.ma, 'error_type', u.etype,
                'error_code', u.ecode, 'error_msg', u.emsg)),
            ('RETRY_SCHEDULED', u.outcome = 'TRANSIENT' AND u.status = 'PENDING', jsonb_build_object(
                'msg_id', u.mid, 'attempt', u.att, 'max_attempts', u.ma, 'backoff_seconds', u.backoff)),
            ('RETRY_EXHAUSTED', u.outcome = 'TRANSIENT' AND u.status = 'IN_TROUBLESHOOTING_QUEUE', jsonb_build_object(
                'msg_id', u.mid, 'attempt', u.att, 'max_attempts', u.ma)),
            ('MOVED_TO_TSQ', u.outcome = 'TRANSIENT' AND u.status = 'IN_TROUBLESHOOTING_QUEUE', jsonb_build_object(
                'msg_id', u.mid, 'attempt', u.att, 'max_attempts', u.ma, 'reason', 'EXHAUSTED',
                'error_type', u.etype, 'error_code', u.ecode, 'error_msg', u.emsg)),
            ('MOVED_TO_TSQ', u.outcome = 'PERMANENT', jsonb_build_object(
                'msg_id', u.mid, 'attempt', u.att, 'reason', 'PERMANENT', 'error_type', u.etype,
                'error_code', u.ecode, 'error_msg', u.emsg, 'error_details', u.edetails)),
            ('BUSINESS_RULE_FAILED', u.outcome = 'BUSINESS_RULE', jsonb_build_object(
                'msg_id', u.mid, 'attempt', u.att, 'error_code', u.ecode, 'error_msg', u.emsg,
                'error_details', u.edetails))
        ) AS e(ev, keep, details)
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

-- Pushes the visibility of leased messages forward (HandlerContext.extend_visibility and the
-- lease keeper). Fenced by (msg_id, attempt); returns how many leases were extended.
CREATE OR REPLACE FUNCTION commandbus.extend_leases_v1(
    p_domain TEXT, p_command_ids UUID[], p_msg_ids BIGINT[], p_attempts INT[], p_seconds INT
) RETURNS INT
LANGUAGE plpgsql
-- Row lookups must be unique-index probes whatever the statistics say (right after a bulk
-- send the planner believed the table tiny and scanned a whole domain per claim: 10x slower).
-- Hash joins stay on: without them the input arrays were rescanned per row (a flush of 1,000
-- took 430 ms instead of 40 ms).
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_ids BIGINT[];
BEGIN
    SELECT array_agg(c.msg_id) INTO v_ids
    FROM commandbus.command c
    JOIN unnest(p_command_ids, p_msg_ids, p_attempts) AS t(cid, mid, att)
      ON c.command_id = t.cid AND c.msg_id = t.mid AND c.attempts = t.att
    WHERE c.domain = p_domain AND c.command_id = ANY (p_command_ids) AND c.status = 'IN_PROGRESS';
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM pgmq.set_vt(p_domain || '__commands', m, p_seconds) FROM unnest(v_ids) m;
    RETURN array_length(v_ids, 1);
END $$;

-- Gives claimed but unstarted messages back (graceful stop): the attempt is undone, the message
-- becomes visible at once, and a RELEASED audit row is written. Fenced by (msg_id, attempt).
CREATE OR REPLACE FUNCTION commandbus.release_commands_v1(
    p_domain TEXT, p_command_ids UUID[], p_msg_ids BIGINT[], p_attempts INT[]
) RETURNS INT
LANGUAGE plpgsql
-- Row lookups must be unique-index probes whatever the statistics say (right after a bulk
-- send the planner believed the table tiny and scanned a whole domain per claim: 10x slower).
-- Hash joins stay on: without them the input arrays were rescanned per row (a flush of 1,000
-- took 430 ms instead of 40 ms).
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_ids BIGINT[];
BEGIN
    WITH upd AS (
        UPDATE commandbus.command c
        SET attempts = c.attempts - 1,
            status = 'PENDING',
            updated_at = now()
        FROM unnest(p_command_ids, p_msg_ids, p_attempts) AS t(cid, mid, att)
        WHERE c.domain = p_domain AND c.command_id = ANY (p_command_ids) AND c.command_id = t.cid AND c.msg_id = t.mid AND c.attempts = t.att
          AND c.status = 'IN_PROGRESS'
        RETURNING c.command_id, c.msg_id, t.att
    ), aud AS (
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        SELECT p_domain, u.command_id, 'RELEASED', jsonb_build_object('msg_id', u.msg_id, 'attempt', u.att)
        FROM upd u
    )
    SELECT array_agg(u.msg_id) INTO v_ids FROM upd u;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM pgmq.set_vt(p_domain || '__commands', m, 0) FROM unnest(v_ids) m;
    RETURN array_length(v_ids, 1);
END $$;

-- Analyzes the command table once if it never was. Right after a bulk load the planner has no
-- statistics, takes a domain for a handful of rows and scans it whole per claim (1.4 s for a
-- claim of 128 instead of 7 ms); one ANALYZE fixes it for good (estimates then scale with the
-- table's size). Called at worker start; a role that may not ANALYZE just skips it.
CREATE OR REPLACE FUNCTION commandbus.refresh_statistics_v1() RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
BEGIN
    -- Workers starting together: one of them analyzes, the others go on at once.
    IF pg_try_advisory_xact_lock(hashtext('commandbus.refresh_statistics'))
       AND EXISTS (SELECT 1 FROM pg_stat_user_tables s
                   WHERE s.schemaname = 'commandbus' AND s.relname = 'command'
                     AND s.last_analyze IS NULL AND s.last_autoanalyze IS NULL
                     AND (s.n_live_tup > 0 OR s.n_mod_since_analyze > 0)) THEN
        ANALYZE commandbus.command;
        RETURN TRUE;
    END IF;
    RETURN FALSE;
EXCEPTION WHEN insufficient_privilege THEN
    RETURN FALSE;
END $$;

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (2, 'protocol') ON CONFLICT (version) DO NOTHING;
