-- The commandbus schema and its protocol functions.
--
-- Every driver (the Rust engine, the psycopg path, any SQL caller) goes through these functions
-- or the statements of sql/statements/, so any connection writes identical rows. Functions work
-- on arrays: one call per batch of commands, set-based statements inside, never one statement
-- per command. Their names carry a version (_v1, _v2): a change of signature or meaning is a new
-- function in a new migration, so clients of both versions can run during an upgrade.
--
-- Compatible with reliable-cmd 0.2.2: the same schema, tables and column names, so a database
-- created by the predecessor (its packaged schema or its repository's migrations, with its own
-- process tables and sp_* functions) upgrades in place. Hence every statement here is
-- idempotent (IF NOT EXISTS, ADD COLUMN IF NOT EXISTS, CREATE OR REPLACE): it also runs over
-- objects that exist already, and get_schema_sql() output can be run more than once.
-- PGMQ must be installed first (setup_database() does it: extension, or PGMQ's SQL-only install).
--
-- Errors raised here use SQLSTATE class 'CB', so drivers map them to typed exceptions in one
-- place each (python/commandbus/_errors.py, rust/py/src/errors.rs):
--   CB001 duplicate command_id (DETAIL = the id)
--   CB002 unknown batch_id (DETAIL = the id)
--   CB003 invalid input (DETAIL = the offending value: a queue name, 'commands', a batch type...)
--   CB004 the command is not in the TSQ (DETAIL = its current status)
--   CB005 no such command in the domain (DETAIL = the command_id)
--   CB006 the command cannot be retried: its archived queue message is missing or is not a JSON
--         object (DETAIL = the command_id)
--   CB007 a batch with this batch_id already exists in the domain (DETAIL = the batch_id)
--   CB008 the batch is already complete (DETAIL = the batch_id)
--
-- Planner settings. The hot-path functions carry SET clauses, because their plans must not
-- depend on the statistics of the moment:
--   * enable_seqscan / enable_bitmapscan / enable_mergejoin off: a row lookup is a unique-index
--     probe whatever the statistics say. Right after a bulk send the statistics describe a tiny
--     table, and the planner scanned a whole domain once per claimed message instead. Hash joins
--     stay on: without them the input arrays are rescanned once per row.
--   * enable_nestloop off where a function joins its input arrays to command rows (finish,
--     complete, extend, release; the claim's UPDATE, switched inside the function): plpgsql's
--     generic plan (used from the sixth call on) estimates unnest(array) at 10 rows and, with
--     statistics from before the claims began, `status = 'IN_PROGRESS'` at 1 row, then puts the
--     command rows outside a nested loop and re-reads the whole input array once per row. With
--     nested loops off the join is a hash join whatever the estimates (the LATERAL VALUES of the
--     audit rows still nest: the one way to run them). Reading the queue keeps nested loops:
--     its UPDATE joins the locked rows back to the queue table by index.
--   * jit off: a disabled plan node is priced at 1e10, far above jit_above_cost, so these calls
--     would be JIT-compiled every time; they touch at most a few thousand rows and never gain.
-- send_commands_v2 has none: every lookup there is a unique-index probe anyway, and saving and
-- restoring the settings is a noticeable part of a single send.

CREATE SCHEMA IF NOT EXISTS commandbus;

-- The migrations applied (setup_database() reads it; each migration also records itself, so a
-- migration tool running get_schema_sql() output is tracked too).
CREATE TABLE IF NOT EXISTS commandbus.schema_migrations (
    version     INT PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

-- A batch of commands (or of processes, batch_type 'PROCESS'). Its counters move only in
-- apply_batch_delta_v1, which also decides completion.
CREATE TABLE IF NOT EXISTS commandbus.batch (
    domain                    TEXT NOT NULL,
    batch_id                  UUID NOT NULL,
    name                      TEXT NULL,
    custom_data               JSONB NULL,
    status                    TEXT NOT NULL DEFAULT 'PENDING',
    total_count               INT NOT NULL DEFAULT 0,
    completed_count           INT NOT NULL DEFAULT 0,
    canceled_count            INT NOT NULL DEFAULT 0,
    in_troubleshooting_count  INT NOT NULL DEFAULT 0,
    created_at                TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    started_at                TIMESTAMPTZ NULL,
    completed_at              TIMESTAMPTZ NULL,
    failed_count              INT NOT NULL DEFAULT 0,
    batch_type                TEXT NOT NULL DEFAULT 'COMMAND',
    updated_at                TIMESTAMPTZ NULL,
    PRIMARY KEY (domain, batch_id)
);
-- The predecessor's batch table lacks some of these columns (which ones depends on how it was
-- installed).
ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS failed_count INT NOT NULL DEFAULT 0;
ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS batch_type TEXT NOT NULL DEFAULT 'COMMAND';
ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ NULL;
CREATE INDEX IF NOT EXISTS ix_batch_status ON commandbus.batch(domain, status);
CREATE INDEX IF NOT EXISTS ix_batch_created ON commandbus.batch(domain, created_at DESC);

-- One row per command: its state, lease token (msg_id, attempts) and last error. The payload
-- lives in the PGMQ message only.
--
-- The hot path updates each row twice (claim: IN_PROGRESS, flush: COMPLETED...). No index may
-- cover a column the hot path writes (status, attempts, updated_at, result, last_error_*):
-- with none, and free room on each page (fillfactor), PostgreSQL updates the row in place (a
-- heap-only tuple) and touches no index at all. Hence:
--   * the TSQ is found through `in_tsq`, a stored generated column that changes only when a row
--     enters or leaves the TSQ, and the partial index ix_command_tsq; TSQ queries say
--     `in_tsq AND status = 'IN_TROUBLESHOOTING_QUEUE'`;
--   * other status filters (query_commands) walk ix_command_created and filter;
--   * retention walks ix_command_created as well: a row's updated_at is never before its
--     created_at, so `created_at < cutoff` finds every row with `updated_at < cutoff`.
CREATE TABLE IF NOT EXISTS commandbus.command (
    domain            TEXT NOT NULL,
    queue_name        TEXT NOT NULL,
    msg_id            BIGINT NULL,
    command_id        UUID NOT NULL,
    command_type      TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          INT NOT NULL DEFAULT 0,
    -- NULL: the worker's RetryPolicy decides.
    max_attempts      INT NULL,
    lease_expires_at  TIMESTAMPTZ NULL,
    last_error_type   TEXT NULL,
    last_error_code   TEXT NULL,
    last_error_msg    TEXT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    reply_queue       TEXT NOT NULL DEFAULT '',
    correlation_id    UUID NULL,
    batch_id          UUID NULL,
    -- The handler's return value (also sent in the reply).
    result            JSONB NULL,
    in_tsq            BOOLEAN GENERATED ALWAYS AS (status = 'IN_TROUBLESHOOTING_QUEUE') STORED
) WITH (fillfactor = 80);
-- The predecessor's command table: max_attempts was NOT NULL (it stored the bus default), and
-- `result` and `in_tsq` are new (adding in_tsq rewrites the table once, under its lock).
ALTER TABLE commandbus.command ALTER COLUMN max_attempts DROP NOT NULL;
ALTER TABLE commandbus.command ADD COLUMN IF NOT EXISTS result JSONB NULL;
ALTER TABLE commandbus.command
    ADD COLUMN IF NOT EXISTS in_tsq BOOLEAN
        GENERATED ALWAYS AS (status = 'IN_TROUBLESHOOTING_QUEUE') STORED;
ALTER TABLE commandbus.command SET (fillfactor = 80);
-- The predecessor's indexes on columns the hot path writes (see above): they would turn every
-- claim and flush into index writes.
DROP INDEX IF EXISTS commandbus.ix_command_status_type;
DROP INDEX IF EXISTS commandbus.ix_command_status_created;
DROP INDEX IF EXISTS commandbus.ix_command_updated;
DROP INDEX IF EXISTS commandbus.ix_command_batch_status;
CREATE UNIQUE INDEX IF NOT EXISTS uq_command_domain_cmdid ON commandbus.command(domain, command_id);
CREATE INDEX IF NOT EXISTS ix_command_batch ON commandbus.command(domain, batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS ix_command_tsq ON commandbus.command (domain, command_id) WHERE in_tsq;
CREATE INDEX IF NOT EXISTS ix_command_created ON commandbus.command (created_at);

-- The audit trail of commands and batches (a batch's rows carry its batch_id as command_id).
CREATE TABLE IF NOT EXISTS commandbus.audit (
    audit_id      BIGSERIAL PRIMARY KEY,
    domain        TEXT NOT NULL,
    command_id    UUID NOT NULL,
    event_type    TEXT NOT NULL,
    ts            TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    details_json  JSONB NULL
);
CREATE INDEX IF NOT EXISTS ix_audit_cmdid_ts ON commandbus.audit(command_id, ts);

-- The predecessor's payload archive (read and pruned, no longer written).
CREATE TABLE IF NOT EXISTS commandbus.payload_archive (
    domain        TEXT NOT NULL,
    command_id    UUID NOT NULL,
    payload_json  JSONB NOT NULL,
    archived_at   TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (domain, command_id)
);

-- Processes and their steps. A predecessor database may hold these tables already (with
-- VARCHAR columns and its own indexes): they are kept as they are.
CREATE TABLE IF NOT EXISTS commandbus.process (
    domain         TEXT NOT NULL,
    process_id     UUID NOT NULL,
    process_type   TEXT NOT NULL,
    status         TEXT NOT NULL DEFAULT 'PENDING',
    current_step   TEXT NULL,
    state          JSONB NOT NULL DEFAULT '{}'::jsonb,
    error_code     TEXT NULL,
    error_message  TEXT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    completed_at   TIMESTAMPTZ NULL,
    batch_id       UUID NULL,
    PRIMARY KEY (domain, process_id)
);
CREATE INDEX IF NOT EXISTS ix_process_status ON commandbus.process(domain, status);
CREATE INDEX IF NOT EXISTS ix_process_batch ON commandbus.process(domain, batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS commandbus.process_audit (
    id             BIGSERIAL PRIMARY KEY,
    domain         TEXT NOT NULL,
    process_id     UUID NOT NULL,
    step_name      TEXT NOT NULL,
    command_id     UUID NOT NULL,
    command_type   TEXT NOT NULL,
    command_data   JSONB NULL,
    sent_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    reply_outcome  TEXT NULL,
    reply_data     JSONB NULL,
    received_at    TIMESTAMPTZ NULL
);
CREATE INDEX IF NOT EXISTS ix_process_audit_process ON commandbus.process_audit(domain, process_id, sent_at);
CREATE INDEX IF NOT EXISTS ix_process_audit_command ON commandbus.process_audit(command_id);

-- ---------------------------------------------------------------------------------------------
-- Queues
-- ---------------------------------------------------------------------------------------------

-- Queue tables are vacuumed early: autovacuum settings of their own for each PGMQ queue table
-- (tune_queue_table_v1; ensure_queue_v1 applies them to each queue it creates, V005 to the queues
-- that existed before). See V005 for why and what was measured.
CREATE OR REPLACE FUNCTION commandbus.tune_queue_table_v1(p_queue TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    v_table REGCLASS := to_regclass(format('pgmq.%I', 'q_' || p_queue));
BEGIN
    -- A partitioned queue (pgmq.create_partitioned) takes no storage parameters: its partitions
    -- are dropped whole, not vacuumed away.
    IF v_table IS NULL OR (SELECT c.relkind FROM pg_class c WHERE c.oid = v_table) <> 'r' THEN
        RETURN FALSE;
    END IF;
    EXECUTE format(
        'ALTER TABLE %s SET (autovacuum_vacuum_threshold = 10000, autovacuum_vacuum_scale_factor = 0,'
        ' autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_threshold = 10000,'
        ' autovacuum_analyze_scale_factor = 0, vacuum_index_cleanup = on)', v_table);
    RETURN TRUE;
END $$;

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
    PERFORM commandbus.tune_queue_table_v1(p_queue);
    RETURN TRUE;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Send
-- ---------------------------------------------------------------------------------------------

-- Sends commands of one domain: queue messages, command rows and SENT audit rows in the caller's
-- transaction. p_messages[i] is command i's queue message as the worker reads it (the
-- predecessor's keys: domain, command_type, command_id, correlation_id, reply_to when set,
-- data), built by the client, p_correlation_ids[i] the same correlation id. The messages are
-- written into pgmq.q_<queue> directly, the way pgmq._send_batch does (vt = the send's
-- clock_timestamp(), read_ct 0, enqueued_at now(), no headers; PGMQ's own triggers on the table
-- still fire): pgmq.send_batch's function layers and its `EXECUTE format(...)`, planned on
-- every call, cost more than the rest of a single send. A duplicate command_id (in the input, or
-- already stored, also under a concurrent race) raises CB001 and the whole call rolls back,
-- messages included; a repeated id is caught by the insert itself (ON CONFLICT skips the second
-- row) and named afterwards, so no pass over the ids runs before it. Returns the rows in input
-- order. The statement `send_commands_direct` writes the same rows for plain commands.
CREATE OR REPLACE FUNCTION commandbus.send_commands_v2(
    p_domain TEXT,
    p_command_ids UUID[],
    p_command_types TEXT[],
    p_messages JSONB[],
    p_correlation_ids UUID[],
    p_reply_tos TEXT[],
    p_max_attempts INT[],
    p_batch_ids UUID[]
) RETURNS TABLE (command_id UUID, msg_id BIGINT, correlation_id UUID)
LANGUAGE plpgsql
-- No planner settings here: see the top of this file.
AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_n INT := coalesce(array_length(p_command_ids, 1), 0);
    v_bad TEXT;
    v_inserted INT;
    v_msg_ids BIGINT[];
BEGIN
    IF v_n = 0 THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = v_queue) THEN
        PERFORM commandbus.ensure_queue_v1(v_queue);
    END IF;

    -- The checks below run only where they can find something: each statement of a plpgsql
    -- function is a noticeable part of a single send. A command_id repeated in the
    -- input is caught by the insert (ON CONFLICT skips the second row) and named afterwards.
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

    -- The queue messages, in input order: the one statement that must name the queue's table
    -- (an EXECUTE is parsed and planned on every call: the less it holds, the less that costs).
    EXECUTE format('WITH m AS (INSERT INTO pgmq.%I (vt, message) SELECT $1, unnest($2) RETURNING msg_id)'
                   ' SELECT array_agg(msg_id ORDER BY msg_id) FROM m',
                   'q_' || v_queue)
    INTO v_msg_ids USING clock_timestamp(), p_messages;

    WITH ins AS (
        INSERT INTO commandbus.command AS c (
            domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts,
            reply_queue, correlation_id, batch_id)
        SELECT p_domain, v_queue, t.mid, t.id, t.ct, 'PENDING', 0, t.ma, coalesce(t.rt, ''), t.corr, t.bid
        FROM unnest(p_command_ids, p_command_types, v_msg_ids, p_max_attempts, p_reply_tos, p_correlation_ids, p_batch_ids)
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
        SELECT u::text INTO v_bad FROM unnest(p_command_ids) u GROUP BY u HAVING count(*) > 1 LIMIT 1;
        IF v_bad IS NULL THEN
            SELECT u::text INTO v_bad FROM unnest(p_command_ids) u
            WHERE EXISTS (SELECT 1 FROM commandbus.command c
                      WHERE c.domain = p_domain AND c.command_id = u
                            AND coalesce(c.msg_id, -1) <> ALL (v_msg_ids))
            LIMIT 1;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'CB001',
            MESSAGE = format('duplicate command_id %s in domain %s', v_bad, p_domain), DETAIL = v_bad;
    END IF;

    -- Wake-up hint for listening workers (the predecessor's channel name); polling is the fallback.
    PERFORM pg_notify('pgmq_notify_' || v_queue, '');

    RETURN QUERY SELECT t.id, t.mid, t.corr FROM unnest(p_command_ids, v_msg_ids, p_correlation_ids) AS t(id, mid, corr);
END $$;

-- ---------------------------------------------------------------------------------------------
-- Claim: two steps, two transactions on one connection
-- ---------------------------------------------------------------------------------------------
-- A claim locks the queue rows it reads (FOR UPDATE SKIP LOCKED) until it commits, and every
-- other claim that starts meanwhile walks past those rows one by one. So the lease commits on
-- its own, before the command rows are touched, and the queue rows stay locked only while they
-- are read. The lease token of a claimed command is (msg_id, attempt): finish, complete, extend
-- and release are fenced by it, so a worker whose lease expired cannot apply an outcome. A lease
-- whose claim never ran (the worker died in between) expires with the command untouched: its
-- messages come back and the attempt is not counted.

-- Step 1: leases up to p_qty visible messages of a domain's queue for p_vt seconds and returns
-- their msg_ids. It is pgmq.read's statement, ordered by vt instead of msg_id: pgmq.read walks
-- the queue from its head in msg_id order and skips, one by one, every message another worker
-- holds; in vt order the scan of the queue's vt index starts at the visible messages and never
-- sees a leased one. A new message's vt is its send time, so the order is still the order of
-- sending; a message waiting out a retry backoff comes when its backoff ends. (last_read_at is
-- left alone: older PGMQ versions have no such column.)
-- With p_async_commit the caller's transaction commits without waiting for the disk: lost in a
-- crash, the lease never happened and the messages are visible again, which is what a crash
-- does to a lease anyway. Step 2's commit is flushed, and the WAL is flushed in order, so
-- whatever a handler sees was leased durably.
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

-- Step 2: claims the commands of messages this caller leased with lease_messages_v1: command
-- rows IN_PROGRESS with attempts + 1, RECEIVED audit rows, batches started (BATCH_STARTED).
-- Each command row is looked up once, by the UPDATE itself; only when it claimed fewer commands
-- than there are messages are the leftovers looked up again and sorted out:
--   * malformed (no usable command_id, or no command row): into the TSQ as a new command row
--     with error code MALFORMED_MESSAGE, message archived;
--   * poison (redelivered beyond its max_attempts: its handler kept killing its worker or
--     outliving the lease): into the TSQ with reason EXHAUSTED, message archived;
--   * stale (command terminal, or msg_id superseded): message archived.
CREATE OR REPLACE FUNCTION commandbus.claim_leased_v1(
    p_domain TEXT,
    p_msg_ids BIGINT[],
    p_default_max_attempts INT
) RETURNS TABLE (
    msg_id BIGINT, attempt INT, max_attempts INT, command_id UUID, command_type TEXT,
    data JSONB, correlation_id UUID, reply_to TEXT, batch_id UUID, created_at TIMESTAMPTZ
)
LANGUAGE plpgsql
-- Planner settings: see the top of this file. Nested loops are switched off for the
-- UPDATE only (plpgsql's generic plan nested over the unnested messages, with each row's index
-- probe also checking `command_id = ANY (all ids)`) and back on for the rest.
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
    -- v_cid_all[i] is message i's command_id, NULL where it has none or not a UUID. Casting
    -- all at once is the common case; the regular expression runs only when some message is
    -- malformed and the cast failed.
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

-- ---------------------------------------------------------------------------------------------
-- Flush: outcomes, leases
-- ---------------------------------------------------------------------------------------------

-- Applies handler outcomes of one domain in one call (the worker's flush). Outcome codes:
-- SUCCESS -> COMPLETED (result stored, message deleted, SUCCESS reply);
-- RETRY -> a transient failure retried after the backoff (message visibility pushed forward);
-- EXHAUSTED -> a transient failure of the last allowed attempt: the TSQ with reason EXHAUSTED;
-- PERMANENT -> the TSQ at once; BUSINESS_RULE -> FAILED with a FAILED reply.
-- The worker's retry policy chooses between RETRY and EXHAUSTED (it knows the command's
-- max_attempts from the claim); this function applies what it is told. p_default_max_attempts
-- only fills the audit details of commands sent without a max_attempts.
-- Fenced: a row applies only while the command is IN_PROGRESS under the same (msg_id, attempt)
-- lease; a late outcome from an expired lease changes nothing and is not returned.
-- Batch counters move in one row update per batch per call (apply_batch_delta_v1).
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
-- Planner settings: see the top of this file.
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
    v_bad TEXT;
    r RECORD;
BEGIN
    -- An unknown code (a caller that still sends TRANSIENT and expects this function to choose)
    -- fails the whole flush instead of leaving a row without a status.
    SELECT coalesce(o.code, 'NULL') INTO v_bad FROM unnest(p_outcomes) AS o(code)
    WHERE o.code IS NULL OR o.code NOT IN ('SUCCESS', 'RETRY', 'EXHAUSTED', 'PERMANENT', 'BUSINESS_RULE')
    LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'invalid outcome code (SUCCESS, RETRY, EXHAUSTED, PERMANENT or BUSINESS_RULE)'
            USING ERRCODE = 'CB003', DETAIL = v_bad;
    END IF;
    WITH i AS (
        SELECT * FROM unnest(p_command_ids, p_msg_ids, p_attempts, p_outcomes, p_results, p_error_types,
                             p_error_codes, p_error_msgs, p_error_details, p_backoffs)
               AS i(cid, mid, att, outcome, result, etype, ecode, emsg, edetails, backoff)
    ), upd AS (
        UPDATE commandbus.command c
        SET status = CASE
                WHEN i.outcome = 'SUCCESS' THEN 'COMPLETED'
                WHEN i.outcome = 'BUSINESS_RULE' THEN 'FAILED'
                WHEN i.outcome IN ('PERMANENT', 'EXHAUSTED') THEN 'IN_TROUBLESHOOTING_QUEUE'
                -- Waiting out the backoff: PENDING also fences a repeated outcome for this lease.
                WHEN i.outcome = 'RETRY' THEN 'PENDING' END,
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
        -- Only the kept rows build their details: building all seven for every row would cost
        -- more than the rest of the audit insert.
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
            (2, 'FAILED', u.outcome IN ('RETRY', 'EXHAUSTED')),
            (3, 'RETRY_SCHEDULED', u.outcome = 'RETRY'),
            (4, 'RETRY_EXHAUSTED', u.outcome = 'EXHAUSTED'),
            (5, 'MOVED_TO_TSQ', u.outcome = 'EXHAUSTED'),
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

-- The flush of outcomes that are all SUCCESS (the common case): what finish_commands_v1 does
-- for SUCCESS, without the other outcomes' columns, CASEs and audit kinds. The engine takes it
-- only when every outcome of a flush is SUCCESS.
CREATE OR REPLACE FUNCTION commandbus.complete_commands_v1(
    p_domain TEXT,
    p_command_ids UUID[],
    p_msg_ids BIGINT[],
    p_attempts INT[],
    p_results JSONB[]
) RETURNS TABLE (command_id UUID, status TEXT)
LANGUAGE plpgsql
-- Planner settings: see the top of this file.
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
              ORDER BY u.batch_id) x  -- batch rows locked in one order: no deadlock between flushes
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

-- Pushes the visibility of leased messages forward (HandlerContext.extend_visibility and the
-- lease keeper). Fenced by (msg_id, attempt); returns how many leases were extended.
CREATE OR REPLACE FUNCTION commandbus.extend_leases_v1(
    p_domain TEXT, p_command_ids UUID[], p_msg_ids BIGINT[], p_attempts INT[], p_seconds INT
) RETURNS INT
LANGUAGE plpgsql
-- Planner settings: see the top of this file.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET enable_nestloop = off SET jit = off
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
-- Planner settings: see the top of this file.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET enable_nestloop = off SET jit = off
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
-- statistics and takes a domain for a handful of rows; one ANALYZE fixes it for good (estimates
-- then scale with the table's size). Called at worker start; a role that may not ANALYZE just
-- skips it.
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

-- ---------------------------------------------------------------------------------------------
-- Batches
-- ---------------------------------------------------------------------------------------------

-- The one place batch counters and batch completion are computed (the flush, once per batch per
-- call, and every operator action call it). Moves a batch's counters by the given deltas in one
-- row update. When the batch becomes complete (completed + failed + canceled = total and nothing
-- in the TSQ: a command in the TSQ is not finished, so a batch whose remaining commands all wait
-- there stays IN_PROGRESS until an operator retries, completes or cancels them), sets its final
-- status (COMPLETED, or COMPLETED_WITH_FAILURES when something failed or was canceled), writes a
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

-- Creates a batch (status PENDING) and sends its commands through send_commands_v2 with the same
-- arrays (p_messages as there), in the caller's transaction, so a batch never exists without its
-- commands or the other way round. total_count starts at 0: send_commands_v2 counts every
-- command sent into a batch. Any error (duplicate batch_id CB007, duplicate command_id CB001,
-- ...) rolls back the batch row with everything else.
CREATE OR REPLACE FUNCTION commandbus.create_batch_v2(
    p_domain TEXT,
    p_batch_id UUID,
    p_batch_type TEXT,
    p_name TEXT,
    p_custom_data JSONB,
    p_command_ids UUID[],
    p_command_types TEXT[],
    p_messages JSONB[],
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
       OR coalesce(array_length(p_messages, 1), 0) <> v_n
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
    -- total_count starts at 0: send_commands_v2 counts every command sent into a batch.
    VALUES (p_domain, p_batch_id, p_batch_type, p_name, p_custom_data, 'PENDING', 0)
    ON CONFLICT (domain, batch_id) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB007',
            MESSAGE = format('batch %s already exists in domain %s', p_batch_id, p_domain),
            DETAIL = p_batch_id::text;
    END IF;

    RETURN QUERY
    SELECT s.command_id, s.msg_id, s.correlation_id
    FROM commandbus.send_commands_v2(
        p_domain, p_command_ids, p_command_types, p_messages, p_correlation_ids, p_reply_tos,
        p_max_attempts, array_fill(p_batch_id, ARRAY[v_n])) AS s;
END $$;

-- Recomputes a batch's counters from its command rows, or for a process batch (batch_type
-- 'PROCESS') from its process rows, counted as process_batch_counts_v1 counts them (repair
-- tool; the predecessor's sp_refresh_batch_stats), and applies the difference through
-- apply_batch_delta_v1, so the completion rule, BATCH_COMPLETED and NOTIFY stay in one place.
-- For a process batch, processes blocked on a TSQ command are first found
-- (process_tsq_sync_v1). The batch row is locked before the rows are counted: a flush
-- committing meanwhile cannot be counted twice.
-- Returns TRUE when this call completed the batch.
CREATE OR REPLACE FUNCTION commandbus.refresh_batch_stats_v1(p_domain TEXT, p_batch_id UUID)
RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    b RECORD;
    c RECORD;
    v_type TEXT;
BEGIN
    SELECT x.batch_type INTO v_type FROM commandbus.batch x
    WHERE x.domain = p_domain AND x.batch_id = p_batch_id;
    IF v_type = 'PROCESS' THEN
        -- Before the batch row is locked: the status changes move its counters (trigger).
        PERFORM commandbus.process_tsq_sync_v1(p_domain, NULL);
    END IF;
    SELECT x.completed_count, x.failed_count, x.canceled_count, x.in_troubleshooting_count INTO b
    FROM commandbus.batch x
    WHERE x.domain = p_domain AND x.batch_id = p_batch_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN FALSE;
    END IF;
    IF v_type = 'PROCESS' THEN
        SELECT count(*) FILTER (WHERE commandbus.process_batch_class_v1(y.status) = 'completed')::int AS completed,
               0 AS failed,
               count(*) FILTER (WHERE commandbus.process_batch_class_v1(y.status) = 'canceled')::int AS canceled,
               count(*) FILTER (WHERE commandbus.process_batch_class_v1(y.status) = 'tsq')::int AS tsq
        INTO c
        FROM commandbus.process y
        WHERE y.domain = p_domain AND y.batch_id = p_batch_id;
    ELSE
        SELECT count(*) FILTER (WHERE y.status = 'COMPLETED')::int AS completed,
               count(*) FILTER (WHERE y.status = 'FAILED')::int AS failed,
               count(*) FILTER (WHERE y.status = 'CANCELED')::int AS canceled,
               count(*) FILTER (WHERE y.status = 'IN_TROUBLESHOOTING_QUEUE')::int AS tsq
        INTO c
        FROM commandbus.command y
        WHERE y.domain = p_domain AND y.batch_id = p_batch_id;
    END IF;
    IF (c.completed, c.failed, c.canceled, c.tsq)
       = (b.completed_count, b.failed_count, b.canceled_count, b.in_troubleshooting_count) THEN
        RETURN FALSE;  -- nothing to repair (and a PENDING batch stays PENDING)
    END IF;
    RETURN commandbus.apply_batch_delta_v1(
        p_domain, p_batch_id,
        c.completed - b.completed_count, c.failed - b.failed_count,
        c.canceled - b.canceled_count, c.tsq - b.in_troubleshooting_count);
END $$;

-- ---------------------------------------------------------------------------------------------
-- Process managers (python/commandbus/process/)
-- ---------------------------------------------------------------------------------------------
-- A process row's status moves in the process manager's transactions (start, one reply each);
-- its steps are process_audit rows (one per command sent, reply fields filled once: the fence
-- of a reply delivered twice). Two things happen here, in SQL, because they must hold whoever
-- writes the rows:
--   * the counters of a process batch (batch_type 'PROCESS') follow its processes' statuses,
--     counted as the predecessor counts them: COMPLETED and COMPENSATED -> completed_count,
--     FAILED and CANCELED -> canceled_count, blocked on a TSQ command (WAITING_FOR_TSQ) ->
--     in_troubleshooting_count; failed_count stays 0. The trigger below moves them by the
--     difference of each status change, through apply_batch_delta_v1 (completion rule, BATCH_
--     COMPLETED and NOTIFY in one place); the first process started moves the batch to
--     IN_PROGRESS.
--   * WAITING_FOR_TSQ: a step's command enters the TSQ in the worker's flush (the Rust engine's
--     finish function), which knows nothing of processes; process_tsq_sync_v1 finds such
--     processes from the command rows (the process reply router calls it periodically, and
--     refresh_batch_stats_v1 before counting) and puts them back to WAITING / COMPENSATING once
--     the command left the TSQ without a reply (an operator retry calls it at once).

-- The class of a process status in a process batch's counters.
CREATE OR REPLACE FUNCTION commandbus.process_batch_class_v1(p_status TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_status IN ('COMPLETED', 'COMPENSATED') THEN 'completed'
        WHEN p_status IN ('FAILED', 'CANCELED') THEN 'canceled'
        WHEN p_status = 'WAITING_FOR_TSQ' THEN 'tsq'
        ELSE 'open' END
$$;

-- Trigger of commandbus.process: moves the counters of the row's process batch (old and new
-- batch when batch_id changes) by the status change.
CREATE OR REPLACE FUNCTION commandbus.process_batch_counts_v1() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
DECLARE
    v_old TEXT := 'none';
    v_new TEXT := commandbus.process_batch_class_v1(NEW.status);
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.batch_id IS NOT DISTINCT FROM NEW.batch_id THEN
            v_old := commandbus.process_batch_class_v1(OLD.status);
            IF v_old = v_new THEN
                RETURN NULL;
            END IF;
        ELSIF OLD.batch_id IS NOT NULL AND EXISTS (
                SELECT 1 FROM commandbus.batch b
                WHERE b.domain = OLD.domain AND b.batch_id = OLD.batch_id AND b.batch_type = 'PROCESS') THEN
            v_old := commandbus.process_batch_class_v1(OLD.status);
            PERFORM commandbus.apply_batch_delta_v1(OLD.domain, OLD.batch_id,
                -(v_old = 'completed')::int, 0, -(v_old = 'canceled')::int, -(v_old = 'tsq')::int);
            v_old := 'none';
        END IF;
    END IF;
    IF NEW.batch_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM commandbus.batch b
            WHERE b.domain = NEW.domain AND b.batch_id = NEW.batch_id AND b.batch_type = 'PROCESS') THEN
        RETURN NULL;
    END IF;
    PERFORM commandbus.apply_batch_delta_v1(NEW.domain, NEW.batch_id,
        (v_new = 'completed')::int - (v_old = 'completed')::int, 0,
        (v_new = 'canceled')::int - (v_old = 'canceled')::int,
        (v_new = 'tsq')::int - (v_old = 'tsq')::int);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER process_batch_counts
    AFTER INSERT OR UPDATE OF status, batch_id ON commandbus.process
    FOR EACH ROW EXECUTE FUNCTION commandbus.process_batch_counts_v1();

-- Puts the processes of a domain whose pending step's command (a process_audit row without a
-- reply) is in the TSQ into WAITING_FOR_TSQ, and those in WAITING_FOR_TSQ whose pending command
-- left the TSQ without a reply (operator retry) back into COMPENSATING (a step failed or was
-- canceled before: compensations are running) or WAITING. p_command_ids NULL: every process of
-- the domain; else only the processes of those commands. Each process row is locked and
-- re-checked with a fresh snapshot, so a reply router advancing it meanwhile is not undone.
-- Returns how many processes changed status.
CREATE OR REPLACE FUNCTION commandbus.process_tsq_sync_v1(p_domain TEXT, p_command_ids UUID[])
RETURNS INT
LANGUAGE plpgsql AS $$
DECLARE
    v_ids UUID[];
    v_n INT;
BEGIN
    SELECT array_agg(DISTINCT x.process_id) INTO v_ids
    FROM (
        SELECT a.process_id
        FROM commandbus.command c
        JOIN commandbus.process_audit a ON a.command_id = c.command_id AND a.domain = c.domain
        JOIN commandbus.process p ON p.domain = a.domain AND p.process_id = a.process_id
        WHERE c.domain = p_domain
          AND c.in_tsq AND c.status = 'IN_TROUBLESHOOTING_QUEUE'  -- in_tsq: ix_command_tsq
          AND (p_command_ids IS NULL OR c.command_id = ANY (p_command_ids))
          AND a.reply_outcome IS NULL
          AND p.status IN ('PENDING', 'IN_PROGRESS', 'WAITING', 'COMPENSATING')
        UNION ALL
        SELECT p.process_id
        FROM commandbus.process p
        WHERE p.domain = p_domain AND p.status = 'WAITING_FOR_TSQ'
          AND (p_command_ids IS NULL OR EXISTS (
                SELECT 1 FROM commandbus.process_audit a
                WHERE a.domain = p.domain AND a.process_id = p.process_id
                  AND a.command_id = ANY (p_command_ids)))
    ) x;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM commandbus.process p
    WHERE p.domain = p_domain AND p.process_id = ANY (v_ids)
    ORDER BY p.process_id
    FOR UPDATE;
    -- A new statement: a new snapshot, which sees what committed while the locks were awaited.
    WITH s AS (
        SELECT p.process_id,
               EXISTS (SELECT 1 FROM commandbus.process_audit a
                       JOIN commandbus.command c ON c.domain = a.domain AND c.command_id = a.command_id
                       WHERE a.domain = p.domain AND a.process_id = p.process_id
                         AND a.reply_outcome IS NULL AND c.status = 'IN_TROUBLESHOOTING_QUEUE') AS blocked,
               EXISTS (SELECT 1 FROM commandbus.process_audit a
                       WHERE a.domain = p.domain AND a.process_id = p.process_id
                         AND a.reply_outcome IN ('FAILED', 'CANCELED')) AS compensating
        FROM commandbus.process p
        WHERE p.domain = p_domain AND p.process_id = ANY (v_ids)
    )
    UPDATE commandbus.process p
    SET status = CASE WHEN s.blocked THEN 'WAITING_FOR_TSQ'
                      WHEN s.compensating THEN 'COMPENSATING' ELSE 'WAITING' END,
        updated_at = now()
    FROM s
    WHERE p.domain = p_domain AND p.process_id = s.process_id
      AND ((s.blocked AND p.status IN ('PENDING', 'IN_PROGRESS', 'WAITING', 'COMPENSATING'))
           OR (NOT s.blocked AND p.status = 'WAITING_FOR_TSQ'));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END $$;

-- ---------------------------------------------------------------------------------------------
-- The troubleshooting queue (TSQ): operator retry / cancel / complete
-- ---------------------------------------------------------------------------------------------
-- Every operator action is one call in one transaction: it locks the command rows FOR UPDATE and
-- acts only on rows still IN_TROUBLESHOOTING_QUEUE, so when two operators act on one command at
-- once exactly one succeeds and the other gets CB004. Batch counters move only through
-- apply_batch_delta_v1, one call per batch, in batch_id order (no lock-order deadlock between
-- two bulk calls touching the same batches).

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

-- Re-sends the archived messages of TSQ commands the caller has locked: status PENDING,
-- attempts 0, msg_id = the new message, last_error_type / _code / _msg cleared (as the
-- predecessor's operator_retry does; the errors stay in the audit trail: FAILED and
-- MOVED_TO_TSQ rows carry them), OPERATOR_RETRY audit rows,
-- batch in_troubleshooting - 1, processes in WAITING_FOR_TSQ on them back to waiting
-- (process_tsq_sync_v1), NOTIFY for the workers. The message keeps every archived key;
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
        SET status = 'PENDING', attempts = 0, msg_id = t.mid, last_error_type = NULL,
            last_error_code = NULL, last_error_msg = NULL, updated_at = now()
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

    -- Processes waiting on these commands in WAITING_FOR_TSQ resume waiting for their reply.
    PERFORM commandbus.process_tsq_sync_v1(p_domain, v_ids);
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

-- ---------------------------------------------------------------------------------------------
-- Retention
-- ---------------------------------------------------------------------------------------------

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
        -- has created_at < p_cutoff (there is no index on updated_at: see the command table).
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

INSERT INTO commandbus.schema_migrations (version, name) VALUES (1, 'baseline') ON CONFLICT (version) DO NOTHING;
