-- V006: retention. Prunes old terminal commands with everything that belongs to them, in
-- bounded chunks (commandbus.retention.prune calls prune_v1 in a loop, one transaction per call).

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
        WHERE c.updated_at < p_cutoff
          AND c.status IN ('COMPLETED', 'FAILED', 'CANCELED')
          AND (p_domain IS NULL OR c.domain = p_domain)
        ORDER BY c.updated_at
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

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (6, 'retention') ON CONFLICT (version) DO NOTHING;
