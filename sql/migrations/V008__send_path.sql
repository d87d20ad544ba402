-- V008: a cheaper send (benches/README.md, "What changed", step 5: the send path).
--
-- 1. send_commands_v2 takes the queue messages ready-made (the client builds their JSON, with
--    the correlation ids it generated) and writes them into pgmq.q_<queue> itself, the way
--    pgmq._send_batch does (vt = the send's clock_timestamp(), read_ct 0, enqueued_at now(), no
--    headers; PGMQ's own triggers on the table still fire). Building each message's JSON here
--    was ~10 us of the ~45 us a command cost the database in a bulk send, and pgmq.send_batch's
--    function layers (two plpgsql layers and an `EXECUTE format(...)` planned on every call)
--    were ~60 us of a single send.
-- 2. send_commands_v1 (moved here from V002) and create_batch_v1 (from V005) keep their
--    signatures and results for callers that send `data` (clients of an older version during
--    an upgrade): they build the messages and correlation ids as before (messages_v1) and call
--    send_commands_v2 / create_batch_v2.
-- 3. A command_id repeated in the input is no longer looked for before the insert (a sort of
--    every id): the insert skips the second row (ON CONFLICT) and the error path names it.

-- Sends commands of one domain: queue messages, command rows and SENT audit rows in the caller's
-- transaction. p_messages[i] is command i's queue message as the worker reads it (the
-- predecessor's keys: domain, command_type, command_id, correlation_id, reply_to when set,
-- data), p_correlation_ids[i] the same correlation id. A duplicate command_id (in the input, or
-- already stored, also under a concurrent race) raises CB001 and the whole call rolls back,
-- messages included. Returns the rows in input order.
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
-- No planner flags here (unlike claim/finish): every lookup is a unique-index probe anyway,
-- and the flags' save/restore cost a fifth of a single send (305 -> 240 us in a loop).
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
    -- function costs ~15 us, which is a tenth of a single send. A command_id repeated in the
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

-- Creates a batch (status PENDING; total_count = number of commands, counted by send_commands_v2) and sends its commands
-- through send_commands_v2 with the same arrays (p_messages as there), in the caller's transaction: queue
-- messages, command rows and SENT audit rows. Any error (duplicate batch_id CB007, duplicate
-- command_id CB001, ...) rolls back the batch row with everything else.
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

-- The version-1 inputs (`data`, correlation ids that may be NULL) as version-2 inputs: the
-- correlation ids (NULL ones generated) and each command's queue message, in input order.
CREATE OR REPLACE FUNCTION commandbus.messages_v1(
    p_domain TEXT,
    p_command_ids UUID[],
    p_command_types TEXT[],
    p_data JSONB[],
    p_correlation_ids UUID[],
    p_reply_tos TEXT[],
    OUT correlation_ids UUID[],
    OUT messages JSONB[]
)
LANGUAGE sql VOLATILE
AS $$
    SELECT array_agg(x.corr ORDER BY x.o),
           array_agg(jsonb_strip_nulls(jsonb_build_object(
                         'domain', p_domain,
                         'command_type', x.ct,
                         'command_id', x.id,
                         'correlation_id', x.corr,
                         'reply_to', nullif(x.rt, '')))
                     || jsonb_build_object('data', coalesce(x.data, '{}'::jsonb)) ORDER BY x.o)
    FROM (SELECT t.id, t.ct, coalesce(t.c, gen_random_uuid()) AS corr, t.rt, t.data, t.o
          FROM unnest(p_command_ids, p_command_types, p_correlation_ids, p_reply_tos, p_data)
               WITH ORDINALITY AS t(id, ct, c, rt, data, o)) x
$$;

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
LANGUAGE sql VOLATILE
AS $$
    SELECT s.command_id, s.msg_id, s.correlation_id
    FROM commandbus.messages_v1(p_domain, p_command_ids, p_command_types, p_data,
                                p_correlation_ids, p_reply_tos) AS m,
         LATERAL commandbus.send_commands_v2(p_domain, p_command_ids, p_command_types,
                                             m.messages, m.correlation_ids, p_reply_tos,
                                             p_max_attempts, p_batch_ids) AS s
$$;

CREATE OR REPLACE FUNCTION commandbus.create_batch_v1(
    p_domain TEXT,
    p_batch_id UUID,
    p_batch_type TEXT,
    p_name TEXT,
    p_custom_data JSONB,
    p_command_ids UUID[],
    p_command_types TEXT[],
    p_data JSONB[],
    p_correlation_ids UUID[],
    p_reply_tos TEXT[],
    p_max_attempts INT[]
) RETURNS TABLE (command_id UUID, msg_id BIGINT, correlation_id UUID)
LANGUAGE sql VOLATILE
AS $$
    SELECT s.command_id, s.msg_id, s.correlation_id
    FROM commandbus.messages_v1(p_domain, p_command_ids, p_command_types, p_data,
                                p_correlation_ids, p_reply_tos) AS m,
         LATERAL commandbus.create_batch_v2(p_domain, p_batch_id, p_batch_type, p_name,
                                            p_custom_data, p_command_ids, p_command_types,
                                            m.messages, m.correlation_ids, p_reply_tos,
                                            p_max_attempts) AS s
$$;
