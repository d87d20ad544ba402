-- History partitions: the audit trail partitioned by day, and retention by whole partitions.
--
-- commandbus.audit becomes a table partitioned by RANGE (ts) with the same name and columns, so
-- every query of ours and of the predecessor keeps working:
--   * audit_YYYYMMDD: one partition per UTC day, created ahead of time by
--     ensure_audit_partitions_v1 (setup_database() and every worker call it);
--   * audit_legacy: the table as it was before this migration, attached as the oldest partition
--     (MINVALUE up to the day after its newest row): no row is rewritten, ATTACH only reads the
--     table once to check its range. An empty one (a new database) is dropped instead;
--   * audit_default: catches a row no day partition covers (a database left without a worker or
--     setup_database() beyond the days created ahead, or a row dated in the past). The next
--     ensure_audit_partitions_v1 moves the rows of a day it creates out of it.
-- audit_id keeps its sequence (now owned by the partitioned table). A partitioned table cannot
-- have a primary key without its partition key: each partition carries an index on audit_id
-- instead (audit_legacy keeps its primary key), and the partitioned index ix_audit_cmdid_ts
-- (command_id, ts) spans all of them (audit_legacy's own index is attached to it, not rebuilt).
-- Retention (drop_audit_partition_v1) detaches and drops a day partition once its range ends
-- before the cutoff and no command or batch that still exists has a row in it: a pending,
-- running, TSQ or recent command keeps the days of its trail (see prune_v2).

DO $$
DECLARE
    v_max TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
BEGIN
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'commandbus.audit'::regclass) = 'p' THEN
        RETURN;  -- already partitioned
    END IF;
    ALTER TABLE commandbus.audit RENAME TO audit_legacy;
    ALTER INDEX commandbus.ix_audit_cmdid_ts RENAME TO audit_legacy_cmdid_ts;
    CREATE TABLE commandbus.audit (
        audit_id      BIGINT NOT NULL,
        domain        TEXT NOT NULL,
        command_id    UUID NOT NULL,
        event_type    TEXT NOT NULL,
        ts            TIMESTAMPTZ NOT NULL DEFAULT NOW(),
        details_json  JSONB NULL
    ) PARTITION BY RANGE (ts);
    -- The legacy table's sequence (its BIGSERIAL), owned by the new table so that dropping
    -- audit_legacy one day does not drop it.
    EXECUTE format('ALTER TABLE commandbus.audit ALTER COLUMN audit_id SET DEFAULT nextval(%L::regclass)',
                   pg_get_serial_sequence('commandbus.audit_legacy', 'audit_id'));
    EXECUTE format('ALTER SEQUENCE %s OWNED BY commandbus.audit.audit_id',
                   pg_get_serial_sequence('commandbus.audit_legacy', 'audit_id'));
    CREATE INDEX ix_audit_cmdid_ts ON ONLY commandbus.audit (command_id, ts);
    IF EXISTS (SELECT 1 FROM commandbus.audit_legacy) THEN
        SELECT max(ts) INTO v_max FROM commandbus.audit_legacy;
        v_hi := (date_trunc('day', greatest(v_max, now()) AT TIME ZONE 'UTC') + interval '1 day')
                AT TIME ZONE 'UTC';
        EXECUTE format('ALTER TABLE commandbus.audit ATTACH PARTITION commandbus.audit_legacy'
                       ' FOR VALUES FROM (MINVALUE) TO (%L)', v_hi);
        ALTER INDEX commandbus.ix_audit_cmdid_ts ATTACH PARTITION commandbus.audit_legacy_cmdid_ts;
    ELSE
        DROP TABLE commandbus.audit_legacy;
    END IF;
    CREATE TABLE commandbus.audit_default PARTITION OF commandbus.audit DEFAULT;
    CREATE INDEX audit_default_audit_id ON commandbus.audit_default (audit_id);
END $$;

-- The partitions of commandbus.audit with their ranges (range_from NULL: MINVALUE; both NULL and
-- is_default: the default partition).
CREATE OR REPLACE FUNCTION commandbus.audit_partitions_v1()
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
    WHERE i.inhparent = 'commandbus.audit'::regclass
    ORDER BY 3 NULLS FIRST
$$;

-- Creates the day partitions (UTC days) of commandbus.audit from p_from to p_to (inclusive) that
-- do not exist yet; returns how many it created. Idempotent and safe under concurrency: callers
-- take turns on a transaction-level advisory lock, and each sees what the previous one made.
-- A partition is created on its own and attached with a CHECK constraint matching its range, so
-- the attach takes only a SHARE UPDATE EXCLUSIVE lock on commandbus.audit (writers go on) and
-- reads nothing. Rows of that day waiting in audit_default are moved into the new partition first.
CREATE OR REPLACE FUNCTION commandbus.ensure_audit_partitions_v1(p_from DATE, p_to DATE)
RETURNS INT
LANGUAGE plpgsql AS $$
DECLARE
    d DATE;
    v_lo TIMESTAMPTZ;
    v_hi TIMESTAMPTZ;
    v_name TEXT;
    v_created INT := 0;
BEGIN
    IF p_from IS NULL OR p_to IS NULL OR p_to < p_from OR p_to - p_from > 3660 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('ensure_audit_partitions_v1: invalid day range %L to %L', p_from, p_to),
            DETAIL = 'days';
    END IF;
    -- Without the lock first: usually every day exists already.
    IF NOT EXISTS (
        WITH p AS MATERIALIZED (
            SELECT * FROM commandbus.audit_partitions_v1() x WHERE NOT x.is_default)
        SELECT 1 FROM generate_series(p_from, p_to, interval '1 day') AS g(day)
        WHERE NOT EXISTS (
            SELECT 1 FROM p
            WHERE coalesce(p.range_from, '-infinity') <= (g.day::timestamp AT TIME ZONE 'UTC')
              AND coalesce(p.range_to, 'infinity') > (g.day::timestamp AT TIME ZONE 'UTC'))
    ) THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('commandbus.audit partitions'));
    FOR d IN SELECT g::date FROM generate_series(p_from, p_to, interval '1 day') AS g LOOP
        v_lo := d::timestamp AT TIME ZONE 'UTC';
        v_hi := (d + 1)::timestamp AT TIME ZONE 'UTC';
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM commandbus.audit_partitions_v1() p
            WHERE NOT p.is_default
              AND coalesce(p.range_from, '-infinity') < v_hi
              AND coalesce(p.range_to, 'infinity') > v_lo);
        v_name := 'audit_' || to_char(d, 'YYYYMMDD');
        EXECUTE format('CREATE TABLE commandbus.%I (LIKE commandbus.audit INCLUDING DEFAULTS)', v_name);
        EXECUTE format('CREATE INDEX %I ON commandbus.%I (audit_id)', v_name || '_audit_id', v_name);
        EXECUTE format('ALTER TABLE commandbus.%I ADD CONSTRAINT %I CHECK (ts >= %L AND ts < %L)',
                       v_name, v_name || '_range', v_lo, v_hi);
        EXECUTE format(
            'WITH m AS (DELETE FROM commandbus.audit_default WHERE ts >= $1 AND ts < $2'
            ' RETURNING audit_id, domain, command_id, event_type, ts, details_json)'
            ' INSERT INTO commandbus.%I (audit_id, domain, command_id, event_type, ts, details_json)'
            ' SELECT * FROM m', v_name) USING v_lo, v_hi;
        EXECUTE format('ALTER TABLE commandbus.audit ATTACH PARTITION commandbus.%I FOR VALUES FROM (%L) TO (%L)',
                       v_name, v_lo, v_hi);
        v_created := v_created + 1;
    END LOOP;
    RETURN v_created;
END $$;

-- Whether a partition of commandbus.audit (ending at p_range_to) holds a row of a command or a
-- batch that still exists. Such a row was written after the command's (batch's) creation, so
-- only commands and batches created before p_range_to are probed, each by one index lookup:
-- after pruning they are the few still pending, running, in the TSQ or within retention.
CREATE OR REPLACE FUNCTION commandbus.audit_partition_in_use_v1(p_partition TEXT, p_range_to TIMESTAMPTZ)
RETURNS BOOLEAN
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off AS $$
DECLARE
    v_used BOOLEAN;
BEGIN
    EXECUTE format(
        'SELECT EXISTS (SELECT 1 FROM commandbus.command c WHERE c.created_at < $1'
        '  AND EXISTS (SELECT 1 FROM commandbus.%1$I a'
        '              WHERE a.command_id = c.command_id AND a.domain = c.domain))'
        ' OR EXISTS (SELECT 1 FROM commandbus.batch b WHERE b.created_at < $1'
        '  AND EXISTS (SELECT 1 FROM commandbus.%1$I a'
        '              WHERE a.command_id = b.batch_id AND a.domain = b.domain))', p_partition)
    INTO v_used USING p_range_to;
    RETURN v_used;
END $$;

-- Drops the oldest partition of commandbus.audit whose range ends at or before p_cutoff and that
-- no existing command or batch uses (audit_partition_in_use_v1), the default partition never.
-- One partition per call (call until dropped is NULL; NULL at once while another transaction
-- creates or drops partitions): it detaches it under a short lock of
-- commandbus.audit (lock_timeout 5 s: a call that cannot get it fails and the next one retries),
-- checks again under that lock, and drops it. Returns the partition dropped (NULL: none), its
-- estimated row count (pg_class.reltuples; -1 when never analysed), and how many partitions past
-- the cutoff are kept because a command or batch still uses them.
CREATE OR REPLACE FUNCTION commandbus.drop_audit_partition_v1(p_cutoff TIMESTAMPTZ)
RETURNS TABLE (dropped TEXT, est_rows BIGINT, kept INT)
LANGUAGE plpgsql AS $$
DECLARE
    r RECORD;
    v_kept INT := 0;
    v_rows BIGINT;
BEGIN
    IF p_cutoff IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = 'drop_audit_partition_v1: cutoff is NULL', DETAIL = 'cutoff';
    END IF;
    -- One creator or dropper at a time; a pruner that finds another at work leaves it to it.
    IF NOT pg_try_advisory_xact_lock(hashtext('commandbus.audit partitions')) THEN
        RETURN QUERY SELECT NULL::text, 0::bigint, 0;
        RETURN;
    END IF;
    FOR r IN
        SELECT p.partition_name, p.range_to FROM commandbus.audit_partitions_v1() p
        WHERE NOT p.is_default AND p.range_to <= p_cutoff
        ORDER BY p.range_to
    LOOP
        IF commandbus.audit_partition_in_use_v1(r.partition_name, r.range_to) THEN
            v_kept := v_kept + 1;
            CONTINUE;
        END IF;
        BEGIN
            PERFORM set_config('lock_timeout', '5s', true);
            EXECUTE format('ALTER TABLE commandbus.audit DETACH PARTITION commandbus.%I', r.partition_name);
            -- Under the lock now: no transaction is still writing into it.
            IF commandbus.audit_partition_in_use_v1(r.partition_name, r.range_to) THEN
                RAISE EXCEPTION USING ERRCODE = 'CB009',
                    MESSAGE = format('audit partition %s came into use', r.partition_name);
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

-- Deletes up to p_chunk commands as prune_v1 does, with these differences:
--   * their audit rows stay: they go with their day partitions (drop_audit_partition_v1), except
--     those in audit_default, deleted here;
--   * their queue messages are found by the command row's msg_id only (not by the audit trail),
--     and archived messages older than the cutoff are swept per queue (pgmq.a_<domain>__commands,
--     by its archived_at index) unless their command is still pending, in progress or in the TSQ;
--   * a terminal command of a batch that is not complete yet, or that a process not finished yet
--     has sent, is kept (with its rows) until the batch or the process ends;
--   * it goes on from p_after (the last_created_at the previous call returned; NULL: from the
--     start): each chunk walks ix_command_created from where the one before stopped, instead of
--     walking again, from the oldest, over the index entries of every row deleted so far (dead
--     until vacuum: a prune of n commands walked O(n^2 / chunk) of them).
-- Returns the counts deleted and where to go on from: call it until commands, batches and
-- messages are all 0.
CREATE OR REPLACE FUNCTION commandbus.prune_v2(
    p_cutoff TIMESTAMPTZ, p_domain TEXT, p_chunk INT, p_after TIMESTAMPTZ DEFAULT NULL)
RETURNS TABLE (commands INT, audit_events INT, payloads INT, messages INT, batches INT,
               last_created_at TIMESTAMPTZ)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_domains TEXT[];
    v_ids UUID[];
    v_queues TEXT[];
    v_msg_ids BIGINT[];
    v_commands INT := 0;
    v_audit INT := 0;
    v_payloads INT := 0;
    v_messages INT := 0;
    v_batches INT := 0;
    v_last TIMESTAMPTZ;
    v_n INT;
    r RECORD;
BEGIN
    IF p_cutoff IS NULL OR p_chunk IS NULL OR p_chunk < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('prune_v2: invalid cutoff %L or chunk %L', p_cutoff, p_chunk),
            DETAIL = coalesce(p_chunk::text, 'NULL');
    END IF;

    WITH victims AS MATERIALIZED (
        SELECT c.domain, c.command_id, c.created_at
        FROM commandbus.command c
        WHERE c.created_at < p_cutoff
          AND c.created_at >= coalesce(p_after, '-infinity')
          AND c.updated_at < p_cutoff
          AND c.status IN ('COMPLETED', 'FAILED', 'CANCELED')
          AND (p_domain IS NULL OR c.domain = p_domain)
          AND (c.batch_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM commandbus.batch b
                WHERE b.domain = c.domain AND b.batch_id = c.batch_id
                  AND b.status NOT IN ('COMPLETED', 'COMPLETED_WITH_FAILURES')))
          AND NOT EXISTS (
                SELECT 1 FROM commandbus.process_audit pa
                JOIN commandbus.process p ON p.domain = pa.domain AND p.process_id = pa.process_id
                WHERE pa.command_id = c.command_id AND pa.domain = c.domain
                  AND p.status NOT IN ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED'))
        ORDER BY c.created_at
        LIMIT p_chunk
    ), del AS (
        -- No row lock before the DELETE (FOR UPDATE would write each row once more, WAL
        -- included): the DELETE locks the row itself and, when another transaction changed it
        -- meanwhile, checks these conditions again on its new version. A terminal command
        -- never becomes live again, and a complete batch never reopens, so they are the ones
        -- that can change; a second pruner waits for the first one's rows and skips them.
        DELETE FROM commandbus.command c
        USING victims v
        WHERE c.domain = v.domain AND c.command_id = v.command_id
          AND c.status IN ('COMPLETED', 'FAILED', 'CANCELED') AND c.updated_at < p_cutoff
        RETURNING c.domain, c.command_id, c.queue_name, c.msg_id
    )
    SELECT count(*), array_agg(d.domain), array_agg(d.command_id), array_agg(d.queue_name),
           array_agg(d.msg_id), (SELECT max(v.created_at) FROM victims v)
    INTO v_commands, v_domains, v_ids, v_queues, v_msg_ids, v_last
    FROM del d;

    IF v_commands > 0 THEN
        WITH del AS (
            DELETE FROM commandbus.audit_default a
            USING unnest(v_domains, v_ids) AS t(dom, cid)
            WHERE a.command_id = ANY (v_ids) AND a.command_id = t.cid AND a.domain = t.dom
            RETURNING 1
        )
        SELECT count(*) INTO v_audit FROM del;

        WITH del AS (
            DELETE FROM commandbus.payload_archive p
            USING unnest(v_domains, v_ids) AS t(dom, cid)
            WHERE p.domain = t.dom AND p.command_id = t.cid
            RETURNING 1
        )
        SELECT count(*) INTO v_payloads FROM del;

        FOR r IN
            SELECT v.q, array_agg(v.mid) AS mids, array_agg(v.cid::text) AS cids
            FROM unnest(v_queues, v_msg_ids, v_ids) AS v(q, mid, cid)
            WHERE v.mid IS NOT NULL
              AND EXISTS (SELECT 1 FROM pgmq.meta x WHERE x.queue_name = v.q)
            GROUP BY v.q
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
        -- Archived messages past the cutoff (earlier attempts of retried commands, poison and
        -- orphan messages) of the domain's command queue, unless their command is still live.
        FOR r IN
            SELECT m.queue_name, left(m.queue_name, length(m.queue_name) - 10) AS dom
            FROM pgmq.meta m
            WHERE m.queue_name LIKE '%\_\_commands'
              AND (p_domain IS NULL OR m.queue_name = p_domain || '__commands')
        LOOP
            EXECUTE format(
                'WITH v AS (SELECT a.msg_id FROM pgmq.%1$I a WHERE a.archived_at < $1'
                '  AND NOT EXISTS (SELECT 1 FROM commandbus.command c'
                '    WHERE c.domain = $2 AND c.command_id::text = a.message->>''command_id'''
                '      AND c.status NOT IN (''COMPLETED'', ''FAILED'', ''CANCELED''))'
                '  ORDER BY a.archived_at LIMIT $3 FOR UPDATE SKIP LOCKED),'
                ' d AS (DELETE FROM pgmq.%1$I a USING v WHERE a.msg_id = v.msg_id RETURNING 1)'
                ' SELECT count(*) FROM d', 'a_' || r.queue_name)
            INTO v_n USING p_cutoff, r.dom, p_chunk;
            v_messages := v_messages + v_n;
        END LOOP;

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
            DELETE FROM commandbus.audit_default a
            USING del d
            WHERE a.command_id = d.batch_id AND a.domain = d.domain
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM del), (SELECT count(*) FROM aud) INTO v_batches, v_n;
        v_audit := v_audit + v_n;
    END IF;

    RETURN QUERY SELECT v_commands, v_audit, v_payloads, v_messages, v_batches,
                        coalesce(v_last, p_after);
END $$;

-- Day partitions for yesterday (UTC) to a week ahead; setup_database() and workers keep them ahead.
SELECT commandbus.ensure_audit_partitions_v1(
    ((now() AT TIME ZONE 'UTC') - interval '1 day')::date, ((now() AT TIME ZONE 'UTC') + interval '7 days')::date);

INSERT INTO commandbus.schema_migrations (version, name) VALUES (4, 'history_partitions') ON CONFLICT (version) DO NOTHING;
