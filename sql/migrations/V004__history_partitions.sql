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
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'commandbus.audit'::regclass) = 'p'
       OR current_setting('commandbus.unpartitioned', true) = 'on' THEN
        RETURN;  -- already partitioned (or the layout before partitions: see V006)
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

-- The day partitions are listed, created and dropped by the functions of V006 (day_partitions_v1,
-- ensure_day_partitions_v1, drop_day_partition_v1), which serve the command table too.

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

-- Deletes up to p_chunk commands as prune_v1 does, with these differences:
--   * their audit rows stay: they go with their day partitions (drop_audit_partition_v1), except
--     those in audit_default, deleted here;
--   * their queue messages are found by the command row's msg_id only (not by the audit trail),
--     and archived messages older than the cutoff are swept per queue (pgmq.a_<domain>__commands,
--     by its archived_at index) unless their command is still pending, in progress or in the TSQ;
--   * a terminal command of a batch that is not complete yet, or that a process not finished yet
--     has sent, is kept (with its rows) until the batch or the process ends;
--   * with the command table partitioned by day (V006), only commands created before the start
--     of the cutoff's UTC day: the rest of that day goes with its partition;
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
    v_before TIMESTAMPTZ := p_cutoff;
    v_n INT;
    r RECORD;
BEGIN
    IF p_cutoff IS NULL OR p_chunk IS NULL OR p_chunk < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB003',
            MESSAGE = format('prune_v2: invalid cutoff %L or chunk %L', p_cutoff, p_chunk),
            DETAIL = coalesce(p_chunk::text, 'NULL');
    END IF;

    -- A partitioned command table (V006) loses its rows by UTC day: only commands created
    -- before the start of the cutoff's day go row by row (those of a day some command still
    -- holds, or of the default partition); the others go with their day's partition once it has
    -- ended before the cutoff. Deleting each hour's commands as the cutoff passes them would
    -- delete every row before its partition could be dropped.
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'commandbus.command'::regclass) = 'p' THEN
        v_before := least(p_cutoff, date_trunc('day', p_cutoff AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');
    END IF;

    WITH victims AS MATERIALIZED (
        SELECT c.domain, c.command_id, c.created_at
        FROM commandbus.command c
        WHERE c.created_at < v_before
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
        -- created_at: the victim's partition only (V006 partitions the table by it).
        WHERE c.domain = v.domain AND c.command_id = v.command_id
          AND c.created_at = v.created_at AND c.created_at < v_before
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

INSERT INTO commandbus.schema_migrations (version, name) VALUES (4, 'history_partitions') ON CONFLICT (version) DO NOTHING;
