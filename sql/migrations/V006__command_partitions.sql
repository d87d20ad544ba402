-- Command partitions: finished commands leave by whole day partitions, as the audit trail does.
--
-- Before this migration a day of finished commands left the command table by row DELETE
-- (prune_v2), and each day's DELETE made autovacuum read the whole table and every index of it
-- (measured at 20,000,000 commands: over 20 minutes, while the workers slowed to 0.77 of their
-- rate; benches/README.md, "History"). Now:
--   * commandbus.command is partitioned by RANGE (created_at), one partition per UTC day
--     (command_YYYYMMDD), created ahead of time like the audit trail's (ensure_day_partitions_v1),
--     with a default partition (command_default) for a row no day covers. The table keeps its
--     name and columns: every query of ours and of the predecessor keeps working.
--   * The table as it was becomes command_legacy, attached as the oldest partition (MINVALUE up
--     to the day after its newest row): no row is rewritten. An empty one is dropped instead.
--   * A partitioned table cannot have a unique index without its partition key, so each
--     partition has its own unique index on (domain, command_id) (the lookups of the hot path),
--     and the promise that a command_id is accepted once per domain is kept by
--     commandbus.command_key_0 and command_key_1, two generations of reservations: every
--     command_id sent is reserved in both (reserve_command_ids_v1, and the direct send
--     statement of sql/statements/send.sql), so a duplicate, also one sent at the same time,
--     fails on a unique index as before. Retention turns them over (rotate_command_keys_v1): once
--     the generation emptied last was emptied before the retention's cutoff, the ids of every
--     command still stored from before that are reserved in it again, and the other generation
--     is emptied (TRUNCATE: no dead rows). So a command_id stays reserved while its command
--     exists, and at least as long as the retention window after its send.
--   * The hot path finds a command's partition by its created_at: the claim by the queue
--     message's enqueued_at (the send writes both, equal; where they are not, e.g. an
--     operator's retry, the claim looks the command up in every partition),
--     the flush, extend and release by the created_at the claim returned (p_created_at_us; a
--     client from before this migration passes none and the rows are looked up in every
--     partition first). Each command of a send gets its own created_at, the send's
--     clock_timestamp() plus one microsecond per command before it in the send (not the
--     transaction's now(), shared by the whole send): the lookup names the exact created_at,
--     and the planner may take the created_at index for it (a statistic taken before the send
--     prices the equality at one row). With one created_at for a whole send, that read every
--     command of the send for each claim (10,000 rows per claim of 64 after a send_batch of
--     10,000, PostgreSQL 15). The offsets stay below the time the rows take to insert, so a
--     created_at is never later than its send's commit.
--   * Retention drops a day partition of commands whole (drop_day_partition_v1) once every row
--     in it is prunable: terminal, last updated before the cutoff, in no unfinished batch or
--     process, and (for a prune of one domain) of that domain only. A partition that still holds
--     a row retention keeps is pruned row by row (prune_v2), as before, and dropped later.
--     prune_v2 deletes only commands created before the start of the cutoff's UTC day: finished
--     commands go by whole days.

-- ---------------------------------------------------------------------------------------------
-- Day partitions of commandbus.audit and commandbus.command
-- ---------------------------------------------------------------------------------------------

-- The partitions of a table partitioned by day with their ranges (range_from NULL: MINVALUE;
-- both NULL and is_default: the default partition).
CREATE OR REPLACE FUNCTION commandbus.day_partitions_v1(p_parent REGCLASS)
RETURNS TABLE (partition_name TEXT, range_from TIMESTAMPTZ, range_to TIMESTAMPTZ, is_default BOOLEAN)
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text,
           CASE WHEN b.bound ~ 'FROM \(MINVALUE\)' OR b.bound = 'DEFAULT' THEN NULL
                ELSE substring(b.bound FROM 'FROM \(''([^'']*)''\)')::timestamptz END,
           CASE WHEN b.bound ~ 'TO \(MAXVALUE\)' OR b.bound = 'DEFAULT' THEN NULL
                ELSE substring(b.bound FROM 'TO \(''([^'']*)''\)')::timestamptz END,
           b.bound = 'DEFAULT'
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
    WHERE i.inhparent = p_parent
    ORDER BY 3 NULLS FIRST
$$;

CREATE OR REPLACE FUNCTION commandbus.audit_partitions_v1()
RETURNS TABLE (partition_name TEXT, range_from TIMESTAMPTZ, range_to TIMESTAMPTZ, is_default BOOLEAN)
LANGUAGE sql STABLE AS $$
    SELECT * FROM commandbus.day_partitions_v1('commandbus.audit')
$$;

-- What a new partition of commandbus.audit or commandbus.command gets besides its columns: the
-- audit rows' index on audit_id; for commands, the fill factor of the table (room for the hot
-- path's heap-only updates), the unique index on (domain, command_id) the hot path looks rows
-- up by, and the (domain, status) statistics the console's estimates read.
CREATE OR REPLACE FUNCTION commandbus.prepare_day_partition_v1(p_parent REGCLASS, p_name TEXT)
RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    IF p_parent = 'commandbus.audit'::regclass THEN
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON commandbus.%I (audit_id)', p_name || '_audit_id', p_name);
    ELSE
        EXECUTE format('ALTER TABLE commandbus.%I SET (fillfactor = 80)', p_name);
        EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS %I ON commandbus.%I (domain, command_id)',
                       p_name || '_domain_cmdid', p_name);
        EXECUTE format('CREATE STATISTICS IF NOT EXISTS commandbus.%I (mcv) ON domain, status FROM commandbus.%I',
                       p_name || '_domain_status', p_name);
    END IF;
END $$;

-- Creates the day partitions (UTC days) of p_parent (commandbus.audit or commandbus.command) from
-- p_from to p_to (inclusive) that do not exist yet; returns how many it created. Idempotent and
-- safe under concurrency: callers take turns on a transaction-level advisory lock, and each sees
-- what the previous one made. A partition is created on its own and attached with a CHECK
-- constraint matching its range, so the attach takes only a SHARE UPDATE EXCLUSIVE lock on the
-- parent (writers go on) and reads nothing. Audit rows of that day waiting in the default
-- partition are moved into the new partition first; a day with command rows in the default
-- partition gets no partition (see below).
CREATE OR REPLACE FUNCTION commandbus.ensure_day_partitions_v1(p_parent REGCLASS, p_from DATE, p_to DATE)
RETURNS INT
LANGUAGE plpgsql AS $$
DECLARE
    d DATE;
    v_lo TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
    v_base TEXT;
    v_key TEXT;
    v_cols TEXT;
    v_name TEXT;
    v_created INT := 0;
BEGIN
    IF p_parent IS NULL OR p_parent NOT IN ('commandbus.audit'::regclass, 'commandbus.command'::regclass) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('ensure_day_partitions_v1: %s is not partitioned by day', p_parent),
            DETAIL = coalesce(p_parent::text, 'NULL');
    END IF;
    IF p_from IS NULL OR p_to IS NULL OR p_to < p_from OR p_to - p_from > 3660 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('ensure_day_partitions_v1: invalid day range %L to %L', p_from, p_to),
            DETAIL = 'days';
    END IF;
    -- Without the lock first: usually every day exists already.
    IF NOT EXISTS (
        WITH p AS MATERIALIZED (
            SELECT * FROM commandbus.day_partitions_v1(p_parent) x WHERE NOT x.is_default)
        SELECT 1 FROM generate_series(p_from, p_to, interval '1 day') AS g(day)
        WHERE NOT EXISTS (
            SELECT 1 FROM p
            WHERE coalesce(p.range_from, '-infinity') <= (g.day::timestamp AT TIME ZONE 'UTC')
              AND coalesce(p.range_to, 'infinity') > (g.day::timestamp AT TIME ZONE 'UTC'))
    ) THEN
        RETURN 0;
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = p_parent) <> 'p' THEN
        RETURN 0;  -- left unpartitioned (commandbus.unpartitioned, below)
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(p_parent::text || ' partitions'));
    SELECT c.relname INTO v_base FROM pg_class c WHERE c.oid = p_parent;
    SELECT a.attname INTO v_key
    FROM pg_partitioned_table pt JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]
    WHERE pt.partrelid = p_parent;
    -- The stored columns (a generated one is computed again on insert).
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO v_cols
    FROM pg_attribute a
    WHERE a.attrelid = p_parent AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    FOR d IN SELECT g::date FROM generate_series(p_from, p_to, interval '1 day') AS g LOOP
        v_lo := d::timestamp AT TIME ZONE 'UTC';
        v_hi := (d + 1)::timestamp AT TIME ZONE 'UTC';
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM commandbus.day_partitions_v1(p_parent) p
            WHERE NOT p.is_default
              AND coalesce(p.range_from, '-infinity') < v_hi
              AND coalesce(p.range_to, 'infinity') > v_lo);
        -- Command rows of that day waiting in the default partition stay there (and that day
        -- gets no partition): moving a row deletes it under a worker that may be claiming or
        -- finishing it, which would then miss it. They are pruned row by row.
        CONTINUE WHEN p_parent = 'commandbus.command'::regclass AND EXISTS (
            SELECT 1 FROM commandbus.command_default c WHERE c.created_at >= v_lo AND c.created_at < v_hi);
        v_name := v_base || '_' || to_char(d, 'YYYYMMDD');
        EXECUTE format('CREATE TABLE commandbus.%I (LIKE %s INCLUDING DEFAULTS INCLUDING GENERATED)', v_name, p_parent);
        PERFORM commandbus.prepare_day_partition_v1(p_parent, v_name);
        EXECUTE format('ALTER TABLE commandbus.%I ADD CONSTRAINT %I CHECK (%I >= %L AND %I < %L)',
                       v_name, v_name || '_range', v_key, v_lo, v_key, v_hi);
        EXECUTE format(
            'WITH m AS (DELETE FROM commandbus.%1$I WHERE %2$I >= $1 AND %2$I < $2 RETURNING %3$s)'
            ' INSERT INTO commandbus.%4$I (%3$s) SELECT * FROM m',
            v_base || '_default', v_key, v_cols, v_name) USING v_lo, v_hi;
        EXECUTE format('ALTER TABLE %s ATTACH PARTITION commandbus.%I FOR VALUES FROM (%L) TO (%L)',
                       p_parent, v_name, v_lo, v_hi);
        v_created := v_created + 1;
    END LOOP;
    RETURN v_created;
END $$;

CREATE OR REPLACE FUNCTION commandbus.ensure_audit_partitions_v1(p_from DATE, p_to DATE)
RETURNS INT
LANGUAGE sql AS $$
    SELECT commandbus.ensure_day_partitions_v1('commandbus.audit', p_from, p_to)
$$;

-- ---------------------------------------------------------------------------------------------
-- The command table, partitioned
-- ---------------------------------------------------------------------------------------------

-- command_id reservations (see the top of this file): two generations, each a table with
-- the same rows, and when each was last emptied (command_key_state).
CREATE TABLE IF NOT EXISTS commandbus.command_key_0 (
    domain      TEXT NOT NULL,
    command_id  UUID NOT NULL,
    PRIMARY KEY (domain, command_id)
);
CREATE TABLE IF NOT EXISTS commandbus.command_key_1 (LIKE commandbus.command_key_0 INCLUDING ALL);
CREATE TABLE IF NOT EXISTS commandbus.command_key_state (
    gen          SMALLINT PRIMARY KEY CHECK (gen IN (0, 1)),
    emptied_at   TIMESTAMPTZ NOT NULL
);

DO $$
DECLARE
    v_max TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
BEGIN
    -- commandbus.unpartitioned = on (a session setting) leaves the audit trail (V004) and the
    -- command table as they were before partitions: benches/history.py builds that layout to
    -- measure the row-by-row retention it replaces (prune_v1) in the same run. Not a supported
    -- way to run: nothing then drops partitions, and only prune_v1 deletes audit rows.
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'commandbus.command'::regclass) = 'p'
       OR current_setting('commandbus.unpartitioned', true) = 'on' THEN
        RETURN;  -- already partitioned (or left as it was)
    END IF;
    ALTER TABLE commandbus.command RENAME TO command_legacy;
    ALTER INDEX commandbus.uq_command_domain_cmdid RENAME TO command_legacy_domain_cmdid;
    ALTER INDEX commandbus.ix_command_batch RENAME TO command_legacy_batch;
    ALTER INDEX commandbus.ix_command_tsq RENAME TO command_legacy_tsq;
    ALTER INDEX commandbus.ix_command_created RENAME TO command_legacy_created;
    -- Statistics of the whole table: autovacuum never analyzes a partitioned table, so each
    -- partition gets its own (prepare_day_partition_v1).
    DROP STATISTICS IF EXISTS commandbus.st_command_domain_status;
    CREATE TABLE commandbus.command (LIKE commandbus.command_legacy INCLUDING DEFAULTS INCLUDING GENERATED)
        PARTITION BY RANGE (created_at);
    -- Indexes of every partition (an existing one of the same definition is attached, not
    -- rebuilt). The unique (domain, command_id) index is each partition's own: a partitioned
    -- table's unique index must contain the partition key.
    CREATE INDEX ix_command_batch ON ONLY commandbus.command (domain, batch_id) WHERE batch_id IS NOT NULL;
    CREATE INDEX ix_command_tsq ON ONLY commandbus.command (domain, command_id) WHERE in_tsq;
    CREATE INDEX ix_command_created ON ONLY commandbus.command (created_at);
    IF EXISTS (SELECT 1 FROM commandbus.command_legacy) THEN
        SELECT max(created_at) INTO v_max FROM commandbus.command_legacy;
        v_hi := (date_trunc('day', greatest(v_max, now()) AT TIME ZONE 'UTC') + interval '1 day')
                AT TIME ZONE 'UTC';
        EXECUTE format('ALTER TABLE commandbus.command ATTACH PARTITION commandbus.command_legacy'
                       ' FOR VALUES FROM (MINVALUE) TO (%L)', v_hi);
        CREATE STATISTICS IF NOT EXISTS commandbus.command_legacy_domain_status (mcv)
            ON domain, status FROM commandbus.command_legacy;
        -- Every stored command_id stays reserved (a copy of the ids, not of the rows).
        INSERT INTO commandbus.command_key_0 (domain, command_id)
        SELECT l.domain, l.command_id FROM commandbus.command_legacy l ON CONFLICT DO NOTHING;
        INSERT INTO commandbus.command_key_1 (domain, command_id)
        SELECT l.domain, l.command_id FROM commandbus.command_legacy l ON CONFLICT DO NOTHING;
    ELSE
        DROP TABLE commandbus.command_legacy;
    END IF;
    CREATE TABLE commandbus.command_default PARTITION OF commandbus.command DEFAULT;
    PERFORM commandbus.prepare_day_partition_v1('commandbus.command', 'command_default');
END $$;

INSERT INTO commandbus.command_key_state (gen, emptied_at) VALUES (0, now()), (1, now())
ON CONFLICT DO NOTHING;

-- Reserves command_ids: returns the (domain, command_id) pairs reserved by this call, not those
-- reserved already (by an earlier send, in either generation, or earlier in the input). A pair
-- another transaction is reserving at the same time waits for it, as a unique index does. (A
-- pair found in one generation only is left in the other: it was reserved, and still is.)
CREATE OR REPLACE FUNCTION commandbus.reserve_command_ids_v1(p_domains TEXT[], p_ids UUID[])
RETURNS TABLE (domain TEXT, command_id UUID)
LANGUAGE sql AS $$
    WITH k0 AS (
        INSERT INTO commandbus.command_key_0 AS k (domain, command_id)
        SELECT t.d, t.id FROM unnest(p_domains, p_ids) AS t(d, id)
        ON CONFLICT DO NOTHING
        RETURNING k.domain, k.command_id
    ), k1 AS (
        INSERT INTO commandbus.command_key_1 AS k (domain, command_id)
        SELECT t.d, t.id FROM unnest(p_domains, p_ids) AS t(d, id)
        ON CONFLICT DO NOTHING
        RETURNING k.domain, k.command_id
    )
    SELECT k0.domain, k0.command_id FROM k0 JOIN k1 USING (domain, command_id)
$$;

-- Turns the command_id reservations over once the generation emptied last was emptied before
-- p_cutoff (the retention's cutoff): the ids of the commands still stored from before then are
-- reserved in it again, then the other generation is emptied. Returns whether it turned over
-- (false: not due yet, another rotation is at work, or the lock was not granted within 5 s:
-- the next prune tries again). The TRUNCATE holds an ACCESS EXCLUSIVE lock on the generation
-- it empties: sends wait for that long.
CREATE OR REPLACE FUNCTION commandbus.rotate_command_keys_v1(p_cutoff TIMESTAMPTZ)
RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    v_keep SMALLINT;
    v_since TIMESTAMPTZ;
BEGIN
    IF p_cutoff IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = 'rotate_command_keys_v1: cutoff is NULL', DETAIL = 'cutoff';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('commandbus.command_key rotation')) THEN
        RETURN FALSE;
    END IF;
    -- The generation emptied last is kept; it holds every id sent since v_since.
    SELECT s.gen, s.emptied_at INTO v_keep, v_since FROM commandbus.command_key_state s
    ORDER BY s.emptied_at DESC, s.gen DESC LIMIT 1;
    IF v_since > p_cutoff THEN
        RETURN FALSE;
    END IF;
    -- The commands sent before it that are still stored (kept by retention: live, in the TSQ,
    -- in an unfinished batch or process, or not pruned yet).
    EXECUTE format('INSERT INTO commandbus.%I (domain, command_id)'
                   ' SELECT c.domain, c.command_id FROM commandbus.command c WHERE c.created_at < $1'
                   ' ON CONFLICT DO NOTHING', 'command_key_' || v_keep)
    USING v_since;
    BEGIN
        PERFORM set_config('lock_timeout', '5s', true);
        EXECUTE format('TRUNCATE commandbus.%I', 'command_key_' || (1 - v_keep));
    EXCEPTION WHEN lock_not_available THEN
        RETURN FALSE;
    END;
    UPDATE commandbus.command_key_state SET emptied_at = now() WHERE gen = 1 - v_keep;
    RETURN TRUE;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Retention by day partitions
-- ---------------------------------------------------------------------------------------------

-- Whether a partition of commandbus.command holds a row retention must keep at p_cutoff: not
-- terminal, last updated at or after the cutoff, of a batch that is not complete, sent by a
-- process that has not ended, or (p_domain given) of another domain. The cheap checks come
-- first, each by an index and each ending the check when it finds a kept row: the domains (the
-- ends of the unique index), a command in the TSQ (its partial index: the commonest reason a
-- day is kept, and one an hourly retention would otherwise find again by reading the whole
-- partition), the open batches and the running processes. Only then is the partition read
-- once for the rest (no index covers the columns the hot path writes); that read stops at the
-- first kept row.
CREATE OR REPLACE FUNCTION commandbus.command_partition_in_use_v1(
    p_partition TEXT, p_cutoff TIMESTAMPTZ, p_domain TEXT)
RETURNS BOOLEAN
LANGUAGE plpgsql
SET jit = off SET enable_seqscan = off AS $$
DECLARE
    v_used BOOLEAN;
BEGIN
    EXECUTE format(
        'SELECT ($2::text IS NOT NULL AND ('
        '         (SELECT min(c.domain) FROM commandbus.%1$I c) <> $2'
        '      OR (SELECT max(c.domain) FROM commandbus.%1$I c) <> $2))'
        ' OR EXISTS (SELECT 1 FROM commandbus.%1$I c WHERE c.in_tsq)'
        ' OR EXISTS (SELECT 1 FROM commandbus.batch b'
        '            WHERE b.status NOT IN (''COMPLETED'', ''COMPLETED_WITH_FAILURES'')'
        '              AND EXISTS (SELECT 1 FROM commandbus.%1$I c'
        '                          WHERE c.domain = b.domain AND c.batch_id = b.batch_id))'
        ' OR EXISTS (SELECT 1 FROM commandbus.process p'
        '            JOIN commandbus.process_audit pa ON pa.domain = p.domain AND pa.process_id = p.process_id'
        '            WHERE p.status NOT IN (''COMPLETED'', ''COMPENSATED'', ''FAILED'', ''CANCELED'')'
        '              AND EXISTS (SELECT 1 FROM commandbus.%1$I c'
        '                          WHERE c.domain = pa.domain AND c.command_id = pa.command_id))',
        p_partition)
    INTO v_used USING p_cutoff, p_domain;
    IF v_used THEN
        RETURN TRUE;
    END IF;
    PERFORM set_config('enable_seqscan', 'on', true);
    EXECUTE format(
        'SELECT EXISTS (SELECT 1 FROM commandbus.%I c'
        '               WHERE c.status NOT IN (''COMPLETED'', ''FAILED'', ''CANCELED'') OR c.updated_at >= $1)',
        p_partition)
    INTO v_used USING p_cutoff;
    RETURN v_used;
END $$;

-- Drops the oldest partition of p_parent (commandbus.audit or commandbus.command) whose range
-- ends at or before p_cutoff and that retention may drop whole, the default partition never:
--   * audit: no command or batch that still exists has a row in it (audit_partition_in_use_v1);
--   * command: every row in it is prunable at p_cutoff (command_partition_in_use_v1), for a
--     prune of p_domain (NULL: every domain) only a partition holding that domain alone.
-- One partition per call (call until dropped is NULL; NULL at once while another transaction
-- creates or drops partitions of the table): it detaches it under a short lock of the parent
-- (lock_timeout 5 s: a call that cannot get it fails and the next one retries), checks again
-- under that lock, and drops it. Returns the partition dropped (NULL: none), its estimated row
-- count (pg_class.reltuples; -1 when never analysed), and how many partitions past the cutoff
-- are kept because something in them is still in use.
CREATE OR REPLACE FUNCTION commandbus.drop_day_partition_v1(
    p_parent REGCLASS, p_cutoff TIMESTAMPTZ, p_domain TEXT DEFAULT NULL)
RETURNS TABLE (dropped TEXT, est_rows BIGINT, kept INT)
LANGUAGE plpgsql AS $$
DECLARE
    r RECORD;
    v_kept INT := 0;
    v_rows BIGINT;
    v_audit BOOLEAN := p_parent = 'commandbus.audit'::regclass;
BEGIN
    IF p_cutoff IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = 'drop_day_partition_v1: cutoff is NULL', DETAIL = 'cutoff';
    END IF;
    IF p_parent IS NULL OR p_parent NOT IN ('commandbus.audit'::regclass, 'commandbus.command'::regclass) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('drop_day_partition_v1: %s is not partitioned by day', p_parent),
            DETAIL = coalesce(p_parent::text, 'NULL');
    END IF;
    -- One creator or dropper at a time; a pruner that finds another at work leaves it to it.
    IF NOT pg_try_advisory_xact_lock(hashtext(p_parent::text || ' partitions')) THEN
        RETURN QUERY SELECT NULL::text, 0::bigint, 0;
        RETURN;
    END IF;
    FOR r IN
        SELECT p.partition_name, p.range_to FROM commandbus.day_partitions_v1(p_parent) p
        WHERE NOT p.is_default AND p.range_to <= p_cutoff
        ORDER BY p.range_to
    LOOP
        IF (CASE WHEN v_audit THEN commandbus.audit_partition_in_use_v1(r.partition_name, r.range_to)
                 ELSE commandbus.command_partition_in_use_v1(r.partition_name, p_cutoff, p_domain) END) THEN
            v_kept := v_kept + 1;
            CONTINUE;
        END IF;
        BEGIN
            PERFORM set_config('lock_timeout', '5s', true);
            EXECUTE format('ALTER TABLE %s DETACH PARTITION commandbus.%I', p_parent, r.partition_name);
            -- Under the lock now: no transaction is still writing into it.
            IF (CASE WHEN v_audit THEN commandbus.audit_partition_in_use_v1(r.partition_name, r.range_to)
                     ELSE commandbus.command_partition_in_use_v1(r.partition_name, p_cutoff, p_domain) END) THEN
                RAISE EXCEPTION USING ERRCODE = 'CB009',
                    MESSAGE = format('partition %s came into use', r.partition_name);
            END IF;
            IF NOT v_audit AND EXISTS (SELECT 1 FROM commandbus.payload_archive) THEN
                EXECUTE format('DELETE FROM commandbus.payload_archive p USING commandbus.%I c'
                               ' WHERE p.domain = c.domain AND p.command_id = c.command_id', r.partition_name);
            END IF;
            SELECT c.reltuples::bigint INTO v_rows FROM pg_class c
            WHERE c.oid = format('commandbus.%I', r.partition_name)::regclass;
            EXECUTE format('DROP TABLE commandbus.%I', r.partition_name);
            RETURN QUERY SELECT r.partition_name, v_rows, v_kept;
            RETURN;
        EXCEPTION WHEN SQLSTATE 'CB009' THEN
            v_kept := v_kept + 1;  -- the detach is rolled back with the block
        END;
    END LOOP;
    RETURN QUERY SELECT NULL::text, 0::bigint, v_kept;
END $$;

CREATE OR REPLACE FUNCTION commandbus.drop_audit_partition_v1(p_cutoff TIMESTAMPTZ)
RETURNS TABLE (dropped TEXT, est_rows BIGINT, kept INT)
LANGUAGE sql AS $$
    SELECT * FROM commandbus.drop_day_partition_v1('commandbus.audit', p_cutoff)
$$;

-- ---------------------------------------------------------------------------------------------
-- The hot path, finding command rows by partition
-- ---------------------------------------------------------------------------------------------
-- The claim, flush, extend and release functions force generic plans (plan_cache_mode): a
-- generic plan skips the other partitions when it starts (run-time pruning), while the plan
-- cache, pricing a generic plan over every partition against a custom plan over one, kept
-- choosing custom plans once the older partitions held history, and planned each statement on
-- every call (embedded PostgreSQL 18: 67-69 against 53-62 us of server CPU per command, 2,000,000
-- commands of history against none).
-- The send, step 2 of the claim and the flush, as V001 had them, except for what the partitions
-- change: command_ids are reserved in command_key_0 and _1, and every lookup of a command row names its
-- created_at. The flush functions take the created_at as a new last argument with a default, so
-- a client from before this migration still calls them.

-- The created_at of commands (an array, its least and greatest values) from p_created_at_us
-- (microseconds since the epoch), or, when that is NULL, from the rows themselves (looked up in
-- every partition). The bounds let a generic plan skip other partitions: an array parameter
-- does not.
CREATE OR REPLACE FUNCTION commandbus.created_at_hint_v1(
    p_domain TEXT, p_command_ids UUID[], p_created_at_us BIGINT[])
RETURNS TABLE (created TIMESTAMPTZ[], lo TIMESTAMPTZ, hi TIMESTAMPTZ)
LANGUAGE sql STABLE AS $$
    WITH t AS (
        SELECT 'epoch'::timestamptz + u * interval '1 microsecond' AS ts
        FROM unnest(p_created_at_us) AS u
        WHERE p_created_at_us IS NOT NULL
        UNION ALL
        SELECT c.created_at FROM commandbus.command c
        WHERE p_created_at_us IS NULL AND c.domain = p_domain AND c.command_id = ANY (p_command_ids)
    )
    SELECT array_agg(DISTINCT t.ts), min(t.ts), max(t.ts) FROM t
$$;

DROP FUNCTION IF EXISTS commandbus.finish_commands_v1(TEXT, UUID[], BIGINT[], INT[], TEXT[], JSONB[], TEXT[], TEXT[], TEXT[], JSONB[], INT[], INT);
DROP FUNCTION IF EXISTS commandbus.complete_commands_v1(TEXT, UUID[], BIGINT[], INT[], JSONB[]);
DROP FUNCTION IF EXISTS commandbus.extend_leases_v1(TEXT, UUID[], BIGINT[], INT[], INT);
DROP FUNCTION IF EXISTS commandbus.release_commands_v1(TEXT, UUID[], BIGINT[], INT[]);

-- Sends commands of one domain: queue messages, command rows and SENT audit rows in the caller's
-- transaction. p_messages[i] is command i's queue message as the worker reads it (the
-- predecessor's keys: domain, command_type, command_id, correlation_id, reply_to when set,
-- data), built by the client, p_correlation_ids[i] the same correlation id. The messages are
-- written into pgmq.q_<queue> directly, the way pgmq._send_batch does (vt = the send's
-- clock_timestamp(), read_ct 0, enqueued_at now(), no headers; PGMQ's own triggers on the table
-- still fire): pgmq.send_batch's function layers and its `EXECUTE format(...)`, planned on
-- every call, cost more than the rest of a single send. A duplicate command_id (in the input, or
-- reserved, also under a concurrent race) raises CB001 and the whole call rolls back; the ids
-- are reserved first (reserve_command_ids_v1), so a duplicate is found before anything else is
-- written, and named afterwards: no pass over the ids runs before it. Returns the rows in input
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
-- No planner settings here: see the top of V001.
AS $$
#variable_conflict use_column
DECLARE
    v_queue TEXT := p_domain || '__commands';
    v_n INT := coalesce(array_length(p_command_ids, 1), 0);
    v_bad TEXT;
    v_reserved UUID[];
    v_msg_ids BIGINT[];
    v_t0 TIMESTAMPTZ;
BEGIN
    IF v_n = 0 THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = v_queue) THEN
        PERFORM commandbus.ensure_queue_v1(v_queue);
    END IF;

    -- The checks below run only where they can find something: each statement of a plpgsql
    -- function is a noticeable part of a single send. A command_id repeated in the input, or
    -- reserved before, is left out by the reservation and named afterwards.
    SELECT array_agg(r.command_id) INTO v_reserved
    FROM commandbus.reserve_command_ids_v1(array_fill(p_domain, ARRAY[v_n]), p_command_ids) r;
    IF coalesce(cardinality(v_reserved), 0) < v_n THEN
        SELECT u::text INTO v_bad FROM unnest(p_command_ids) u GROUP BY u HAVING count(*) > 1 LIMIT 1;
        IF v_bad IS NULL THEN
            SELECT u::text INTO v_bad FROM unnest(p_command_ids) u
            WHERE u <> ALL (coalesce(v_reserved, '{}')) LIMIT 1;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'CB001',
            MESSAGE = format('duplicate command_id %s in domain %s', v_bad, p_domain), DETAIL = v_bad;
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

    -- The queue messages, in input order: the one statement that must name the queue's table
    -- (an EXECUTE is parsed and planned on every call: the less it holds, the less that costs).
    -- Command i's created_at, and its message's enqueued_at, is the send's clock_timestamp()
    -- plus i - 1 microseconds: distinct within the send (see the top of this file).
    v_t0 := clock_timestamp();
    EXECUTE format('WITH m AS (INSERT INTO pgmq.%I (vt, message, enqueued_at)'
                   '           SELECT $1, u.m, $1 + (u.o - 1) * interval ''1 microsecond'''
                   '           FROM unnest($2) WITH ORDINALITY AS u(m, o) ORDER BY u.o RETURNING msg_id)'
                   ' SELECT array_agg(msg_id ORDER BY msg_id) FROM m',
                   'q_' || v_queue)
    INTO v_msg_ids USING v_t0, p_messages;

    WITH ins AS (
        INSERT INTO commandbus.command AS c (
            domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts,
            reply_queue, correlation_id, batch_id, created_at, updated_at)
        SELECT p_domain, v_queue, t.mid, t.id, t.ct, 'PENDING', 0, t.ma, coalesce(t.rt, ''), t.corr, t.bid,
               v_t0 + (t.o - 1) * interval '1 microsecond', v_t0 + (t.o - 1) * interval '1 microsecond'
        FROM unnest(p_command_ids, p_command_types, v_msg_ids, p_max_attempts, p_reply_tos, p_correlation_ids, p_batch_ids)
             WITH ORDINALITY AS t(id, ct, mid, ma, rt, corr, bid, o)
        RETURNING c.command_id, c.command_type, c.msg_id, c.correlation_id, c.reply_queue, c.batch_id
    )
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT p_domain, i.command_id, 'SENT', jsonb_build_object(
               'command_type', i.command_type,
               'correlation_id', i.correlation_id,
               'reply_to', nullif(i.reply_queue, ''),
               'msg_id', i.msg_id,
               'batch_id', i.batch_id)
    FROM ins i;

    -- Wake-up hint for listening workers (the predecessor's channel name); polling is the fallback.
    PERFORM pg_notify('pgmq_notify_' || v_queue, '');

    RETURN QUERY SELECT t.id, t.mid, t.corr FROM unnest(p_command_ids, v_msg_ids, p_correlation_ids) AS t(id, mid, corr);
END $$;

-- Step 2: claims the commands of messages this caller leased with lease_messages_v1: command
-- rows IN_PROGRESS with attempts + 1, RECEIVED audit rows, batches started (BATCH_STARTED).
-- Each command row is looked up once, by the UPDATE itself, in the partition of its message's
-- enqueued_at (the send writes the message's enqueued_at and the row's created_at equal: its
-- own instant, see the top of this file). Only when it claimed fewer commands than there are
-- messages are the leftovers looked up again, in every partition: a command whose created_at
-- differs from its message's enqueue time (an operator's retry sent a new message, or the row
-- was written by another client) is claimed then, the rest sorted out:
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
-- Planner settings: see the top of V001. Nested loops are switched off for the
-- UPDATE only (plpgsql's generic plan nested over the unnested messages, with each row's index
-- probe also checking `command_id = ANY (all ids)`) and back on for the rest.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET plan_cache_mode = force_generic_plan SET jit = off
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
    v_total BIGINT := 0;
    v_created TIMESTAMPTZ[];
    v_lo TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
    v_only BIGINT[];
    v_left BIGINT[];
    v_orphans BIGINT[];
    v_poison BIGINT[];
    v_poison_cids UUID[];
    v_n BIGINT;
BEGIN
    -- The messages lease_messages_v1 leased to this caller (one that was deleted or archived
    -- since, by retention or an operator, is simply not there).
    EXECUTE format(
        'SELECT array_agg(q.msg_id ORDER BY q.msg_id), array_agg(q.message ORDER BY q.msg_id),'
        '       array_agg(DISTINCT q.enqueued_at)'
        '  FROM pgmq.%I q WHERE q.msg_id = ANY ($1)',
        'q_' || v_queue)
    INTO v_ids, v_msgs, v_created
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
    -- Two passes at most: the partitions of the messages' enqueue times, then (v_only) the
    -- leftovers in the partitions of their commands' created_at.
    LOOP
    -- The bounds let a generic plan skip the other partitions (an array parameter does not).
    SELECT min(x), max(x) INTO v_lo, v_hi FROM unnest(v_created) x;
    PERFORM set_config('enable_nestloop', 'off', true);
    RETURN QUERY
    WITH m AS (
        SELECT u.mid, u.msg, u.cid
        FROM unnest(v_ids, v_msgs, v_cid_all) AS u(mid, msg, cid)
        WHERE v_only IS NULL OR u.mid = ANY (v_only)
    ), upd AS (
        UPDATE commandbus.command c
        SET attempts = c.attempts + 1, status = 'IN_PROGRESS', updated_at = now()
        FROM m
        WHERE c.domain = p_domain AND c.created_at BETWEEN v_lo AND v_hi AND c.created_at = ANY (v_created)
          AND c.command_id = ANY (v_cids) AND c.command_id = m.cid AND c.msg_id = m.mid
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
    v_total := v_total + v_claimed;
    IF v_total = cardinality(v_ids) THEN
        RETURN;  -- every message claimed: the common case
    END IF;
    EXIT WHEN v_only IS NOT NULL;
    PERFORM set_config('enable_nestloop', 'on', true);
    -- The leftovers' commands stored under another created_at than their message's enqueue time.
    SELECT array_agg(m.mid), array_agg(DISTINCT x.created_at)
    INTO v_only, v_created
    FROM unnest(v_ids, v_cid_all) AS m(mid, cid)
    JOIN commandbus.command x
      ON x.domain = p_domain AND x.command_id = m.cid AND x.msg_id = m.mid
    WHERE x.command_id = ANY (v_cids) AND x.created_at <> ALL (v_created)
      AND x.status IN ('PENDING', 'IN_PROGRESS');
    EXIT WHEN v_only IS NULL;
    END LOOP;
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
        -- A new command row for each orphan whose command_id is free (reserved here: a message
        -- of a command pruned since, whose id is still reserved, is only archived).
        WITH o AS (
            SELECT u.mid, u.msg, u.cid, coalesce(u.cid, gen_random_uuid()) AS id
            FROM unnest(v_ids, v_msgs, v_cid_all) AS u(mid, msg, cid)
            WHERE u.mid = ANY (v_orphans)
        ), r AS (
            SELECT r.command_id
            FROM commandbus.reserve_command_ids_v1(
                     (SELECT array_agg(p_domain) FROM o), (SELECT array_agg(o.id) FROM o)) r
        ), ins AS (
            INSERT INTO commandbus.command AS c (
                domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts,
                last_error_type, last_error_code, last_error_msg)
            SELECT DISTINCT ON (o.id) p_domain, v_queue, o.mid, o.id,
                   coalesce(nullif(o.msg->>'command_type', ''), 'UNKNOWN'),
                   'IN_TROUBLESHOOTING_QUEUE', 1, 1, 'PERMANENT', 'MALFORMED_MESSAGE',
                   CASE WHEN o.cid IS NULL THEN 'queue message has no valid command_id'
                        ELSE 'queue message has no command row' END
            FROM o
            WHERE o.id IN (SELECT r.command_id FROM r)
            ORDER BY o.id, o.mid
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
-- p_created_at_us: each command's created_at (microseconds since the epoch, as the claim
-- returned it), so each row is looked up in its own partition only; NULL (a client from before
-- V006): looked up in every partition first (created_at_hint_v1). The same for complete, extend
-- and release.
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
    p_default_max_attempts INT,
    p_created_at_us BIGINT[] DEFAULT NULL
) RETURNS TABLE (command_id UUID, status TEXT)
LANGUAGE plpgsql
-- Planner settings: see the top of V001.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET plan_cache_mode = force_generic_plan
    SET enable_nestloop = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_created TIMESTAMPTZ[];
    v_lo TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
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
    SELECT h.created, h.lo, h.hi INTO v_created, v_lo, v_hi
    FROM commandbus.created_at_hint_v1(p_domain, p_command_ids, p_created_at_us) h;
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
        WHERE c.domain = p_domain AND c.created_at BETWEEN v_lo AND v_hi AND c.created_at = ANY (v_created)
          AND c.command_id = ANY (p_command_ids) AND c.command_id = i.cid AND c.msg_id = i.mid AND c.attempts = i.att
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
    p_results JSONB[],
    p_created_at_us BIGINT[] DEFAULT NULL
) RETURNS TABLE (command_id UUID, status TEXT)
LANGUAGE plpgsql
-- Planner settings: see the top of V001.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET plan_cache_mode = force_generic_plan
    SET enable_nestloop = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_created TIMESTAMPTZ[];
    v_lo TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
    v_queue TEXT := p_domain || '__commands';
    v_ids UUID[];
    v_delete BIGINT[];
    v_reply_q TEXT[];
    v_reply_msg JSONB[];
    v_batches BIGINT;
    r RECORD;
BEGIN
    SELECT h.created, h.lo, h.hi INTO v_created, v_lo, v_hi
    FROM commandbus.created_at_hint_v1(p_domain, p_command_ids, p_created_at_us) h;
    WITH i AS (
        SELECT * FROM unnest(p_command_ids, p_msg_ids, p_attempts, p_results) AS i(cid, mid, att, result)
    ), upd AS (
        UPDATE commandbus.command c
        SET status = 'COMPLETED', result = i.result, updated_at = now()
        FROM i
        WHERE c.domain = p_domain AND c.created_at BETWEEN v_lo AND v_hi AND c.created_at = ANY (v_created)
          AND c.command_id = ANY (p_command_ids) AND c.command_id = i.cid AND c.msg_id = i.mid AND c.attempts = i.att
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
    p_domain TEXT, p_command_ids UUID[], p_msg_ids BIGINT[], p_attempts INT[], p_seconds INT,
    p_created_at_us BIGINT[] DEFAULT NULL
) RETURNS INT
LANGUAGE plpgsql
-- Planner settings: see the top of V001.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET plan_cache_mode = force_generic_plan
    SET enable_nestloop = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_created TIMESTAMPTZ[];
    v_lo TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
    v_ids BIGINT[];
BEGIN
    SELECT h.created, h.lo, h.hi INTO v_created, v_lo, v_hi
    FROM commandbus.created_at_hint_v1(p_domain, p_command_ids, p_created_at_us) h;
    SELECT array_agg(c.msg_id) INTO v_ids
    FROM commandbus.command c
    JOIN unnest(p_command_ids, p_msg_ids, p_attempts) AS t(cid, mid, att)
      ON c.command_id = t.cid AND c.msg_id = t.mid AND c.attempts = t.att
    WHERE c.domain = p_domain AND c.created_at BETWEEN v_lo AND v_hi AND c.created_at = ANY (v_created)
          AND c.command_id = ANY (p_command_ids) AND c.status = 'IN_PROGRESS';
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM pgmq.set_vt(p_domain || '__commands', m, p_seconds) FROM unnest(v_ids) m;
    RETURN array_length(v_ids, 1);
END $$;

-- Gives claimed but unstarted messages back (graceful stop): the attempt is undone, the message
-- becomes visible at once, and a RELEASED audit row is written. Fenced by (msg_id, attempt).
CREATE OR REPLACE FUNCTION commandbus.release_commands_v1(
    p_domain TEXT, p_command_ids UUID[], p_msg_ids BIGINT[], p_attempts INT[],
    p_created_at_us BIGINT[] DEFAULT NULL
) RETURNS INT
LANGUAGE plpgsql
-- Planner settings: see the top of V001.
SET enable_bitmapscan = off SET enable_mergejoin = off SET enable_seqscan = off
    SET plan_cache_mode = force_generic_plan
    SET enable_nestloop = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_created TIMESTAMPTZ[];
    v_lo TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
    v_ids BIGINT[];
BEGIN
    SELECT h.created, h.lo, h.hi INTO v_created, v_lo, v_hi
    FROM commandbus.created_at_hint_v1(p_domain, p_command_ids, p_created_at_us) h;
    WITH upd AS (
        UPDATE commandbus.command c
        SET attempts = c.attempts - 1,
            status = 'PENDING',
            updated_at = now()
        FROM unnest(p_command_ids, p_msg_ids, p_attempts) AS t(cid, mid, att)
        WHERE c.domain = p_domain AND c.created_at BETWEEN v_lo AND v_hi AND c.created_at = ANY (v_created)
          AND c.command_id = ANY (p_command_ids) AND c.command_id = t.cid AND c.msg_id = t.mid AND c.attempts = t.att
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

-- Analyzes the partitions of the command table that were never analyzed and hold rows. Right
-- after a bulk load the planner has no statistics and takes a domain for a handful of rows; one
-- ANALYZE fixes it for good (estimates then scale with the table's size). Called at worker
-- start; a role that may not ANALYZE just skips it. Returns whether it analyzed any.
CREATE OR REPLACE FUNCTION commandbus.refresh_statistics_v1() RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    r RECORD;
    v_any BOOLEAN := FALSE;
BEGIN
    -- Workers starting together: one of them analyzes, the others go on at once.
    IF NOT pg_try_advisory_xact_lock(hashtext('commandbus.refresh_statistics')) THEN
        RETURN FALSE;
    END IF;
    FOR r IN
        SELECT s.relid FROM pg_stat_user_tables s JOIN pg_inherits h ON h.inhrelid = s.relid
        WHERE h.inhparent = 'commandbus.command'::regclass
          AND s.last_analyze IS NULL AND s.last_autoanalyze IS NULL
          AND (s.n_live_tup > 0 OR s.n_mod_since_analyze > 0)
    LOOP
        EXECUTE format('ANALYZE %s', r.relid::regclass);
        v_any := TRUE;
    END LOOP;
    RETURN v_any;
EXCEPTION WHEN insufficient_privilege THEN
    RETURN FALSE;
END $$;

-- Day partitions for yesterday (UTC) to a week ahead; setup_database() and workers keep them ahead.
SELECT commandbus.ensure_day_partitions_v1(t,
    ((now() AT TIME ZONE 'UTC') - interval '1 day')::date, ((now() AT TIME ZONE 'UTC') + interval '7 days')::date)
FROM unnest(ARRAY['commandbus.audit'::regclass, 'commandbus.command'::regclass]) AS t;

INSERT INTO commandbus.schema_migrations (version, name) VALUES (6, 'command_partitions') ON CONFLICT (version) DO NOTHING;
