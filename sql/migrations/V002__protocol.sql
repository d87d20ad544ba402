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

-- send_commands_v1: see V008 (moved there when the send path began to write the queue table itself).

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
