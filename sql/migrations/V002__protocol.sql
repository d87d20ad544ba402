-- V002: the rcmd protocol as versioned SQL functions (send, lease, release; claim and finish
-- are defined in V007).
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
