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
-- (A command table partitioned by V006 already has these settings on each partition.)
DO $$
BEGIN
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'commandbus.command'::regclass) = 'r' THEN
        ALTER TABLE commandbus.command SET (fillfactor = 80);
        CREATE UNIQUE INDEX IF NOT EXISTS uq_command_domain_cmdid ON commandbus.command(domain, command_id);
    END IF;
END $$;
-- The predecessor's indexes on columns the hot path writes (see above): they would turn every
-- claim and flush into index writes.
DROP INDEX IF EXISTS commandbus.ix_command_status_type;
DROP INDEX IF EXISTS commandbus.ix_command_status_created;
DROP INDEX IF EXISTS commandbus.ix_command_updated;
DROP INDEX IF EXISTS commandbus.ix_command_batch_status;
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

-- The send (send_commands_v2), step 2 of the claim (claim_leased_v1) and the flush
-- (finish_commands_v1, complete_commands_v1, extend_leases_v1, release_commands_v1) live in
-- V006__command_partitions.sql: they find command rows by partition there.

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

-- refresh_statistics_v1 lives in V006 (it analyzes the command table's partitions).

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
