-- The send path: commands of one domain into its queue, command rows and SENT audit rows in
-- one call.

-- name: send_commands
-- Sends commands of one domain through send_commands_v2 (queue messages, command rows,
-- SENT audit rows); the msg_ids in input order.
-- $1 domain TEXT, $2 command_ids UUID[], $3 command_types TEXT[], $4 messages JSONB[],
-- $5 correlation_ids UUID[], $6 reply_tos TEXT[], $7 max_attempts INT[], $8 batch_ids UUID[]
SELECT msg_id FROM commandbus.send_commands_v2($1::text, $2::uuid[], $3::text[], $4::jsonb[], $5::uuid[], $6::text[], $7::int[], $8::uuid[])

-- name: send_commands_direct
-- The send of plain commands (no batch_id, no reply_to) of one domain whose queue exists: the rows
-- `send_commands_v2` writes for them, in one statement with no function call. The Rust engine
-- replaces {queue_table} with the quoted name of the queue's PGMQ table ("q_<domain>__commands"),
-- so the statement is prepared once per connection and domain: the function's `EXECUTE format(...)`
-- is parsed and planned on every call, and each of its plpgsql statements has a cost of its own.
-- The engine sends through the function instead when this statement fails with undefined_table
-- (queue or schema missing: the function creates the queue or names what is missing) or
-- unique_violation (a command_id reserved already: the function names it, CB001). Nothing is written then,
-- as one statement commits or fails whole. Each command's msg_id is taken first (from the queue's
-- own sequence, or $7 when given), so every row of a command carries the same msg_id by
-- construction. The messages' vt is the statement's clock_timestamp(), or $8 (microseconds since
-- the epoch) when given: `send_ordered` reserves msg_ids and vt for each unit in unit order
-- (reserve_msg_ids), so units whose statements run at once still take ids and become claimable in
-- the order they were sent. Returns the msg_ids in input order.
-- $1 domain TEXT, $2 command_ids UUID[], $3 command_types TEXT[], $4 messages JSONB[],
-- $5 correlation_ids UUID[], $6 max_attempts INT[],
-- $7 msg_ids INT8[] (NULL: from the sequence; the whole array may be NULL),
-- $8 vt_us INT8 (NULL: clock_timestamp()),
-- {queue_table} the quoted name of the domain's queue table
WITH t AS MATERIALIZED (
    SELECT coalesce(u.mid, nextval((SELECT pg_get_serial_sequence('pgmq.{queue_table}', 'msg_id'))::regclass)) AS mid,
           u.id, u.ct, u.m, u.corr, u.ma, u.o,
           (SELECT coalesce('epoch'::timestamptz + $8::int8 * interval '1 microsecond', clock_timestamp())) AS vt
    FROM unnest($2::uuid[], $3::text[], $4::jsonb[], $5::uuid[], $6::int[], $7::int8[])
         WITH ORDINALITY AS u(id, ct, m, corr, ma, mid, o)
), q AS (
    -- Command i's created_at and its message's enqueued_at: the vt plus i - 1 microseconds,
    -- distinct within the send (see V006).
    INSERT INTO pgmq.{queue_table} (msg_id, vt, message, enqueued_at) OVERRIDING SYSTEM VALUE
    SELECT t.mid, t.vt, t.m, t.vt + (t.o - 1) * interval '1 microsecond'
    FROM t
), k0 AS (
    -- The command_ids' reservations, in both generations (see V006): a command_id reserved
    -- already, also by a send at the same time, fails with unique_violation.
    INSERT INTO commandbus.command_key_0 (domain, command_id) SELECT $1::text, t.id FROM t
), k1 AS (
    INSERT INTO commandbus.command_key_1 (domain, command_id) SELECT $1::text, t.id FROM t
), c AS (
    INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type, status,
                                    attempts, max_attempts, reply_queue, correlation_id, created_at,
                                    updated_at)
    SELECT $1::text, $1::text || '__commands', t.mid, t.id, t.ct, 'PENDING', 0, t.ma, '', t.corr,
           t.vt + (t.o - 1) * interval '1 microsecond', t.vt + (t.o - 1) * interval '1 microsecond'
    FROM t
), a AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT $1::text, t.id, 'SENT', jsonb_build_object(
               'command_type', t.ct, 'correlation_id', t.corr,
               'reply_to', NULL, 'msg_id', t.mid, 'batch_id', NULL)
    FROM t
)
SELECT array_agg(t.mid ORDER BY t.o) AS msg_ids,
       (SELECT pg_notify('pgmq_notify_' || $1::text || '__commands', '')) IS NULL AS notified
FROM t

-- name: reserve_msg_ids
-- The next `count` msg_ids of a queue, in order, from its own sequence, and the server's
-- clock_timestamp() as microseconds since the epoch: what `send_commands_direct` takes as $7 and $8
-- for a unit of `send_ordered` ({queue_table} as there). A reservation never used leaves a gap in
-- the ids.
-- $1 count INT, {queue_table} as in send_commands_direct
SELECT array_agg(nextval((SELECT pg_get_serial_sequence('pgmq.{queue_table}', 'msg_id'))::regclass) ORDER BY g) AS msg_ids,
       (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS vt_us
FROM generate_series(1, $1::int) AS g
