-- PGMQ queue operations (PgmqClient).

-- name: ensure_queue
-- Creates a PGMQ queue unless it exists (ensure_queue_v1); whether it was created.
-- $1 queue TEXT
SELECT commandbus.ensure_queue_v1($1::text) AS created

-- name: pgmq_send
-- Sends one message and wakes the queue's listeners; its msg_id.
-- $1 queue TEXT, $2 message JSONB, $3 delay_seconds INT, $4 notify_channel TEXT
SELECT s.msg_id FROM pgmq.send($1::text, $2::jsonb, $3::int) AS s(msg_id) CROSS JOIN LATERAL pg_notify($4::text, '') AS n

-- name: pgmq_send_batch
-- Sends messages; their msg_ids in input order.
-- $1 queue TEXT, $2 messages JSONB[], $3 delay_seconds INT
SELECT s.msg_id FROM pgmq.send_batch($1::text, $2::jsonb[], $3::int) WITH ORDINALITY AS s(msg_id, n) ORDER BY s.n

-- name: pgmq_notify
-- Wakes the listeners of a channel.
-- $1 channel TEXT
SELECT pg_notify($1::text, '')

-- name: pgmq_read
-- Reads (leases) up to qty messages for vt seconds, in msg_id order.
-- $1 queue TEXT, $2 vt_seconds INT, $3 qty INT
SELECT msg_id, read_ct, enqueued_at, vt, message FROM pgmq.read($1::text, $2::int, $3::int) ORDER BY msg_id

-- name: pgmq_delete
-- Deletes one message; whether it existed.
-- $1 queue TEXT, $2 msg_id BIGINT
SELECT pgmq.delete($1::text, $2::bigint) AS deleted

-- name: pgmq_delete_batch
-- Deletes messages; the msg_ids deleted.
-- $1 queue TEXT, $2 msg_ids BIGINT[]
SELECT d.msg_id FROM pgmq.delete($1::text, $2::bigint[]) AS d(msg_id)

-- name: pgmq_archive
-- Archives one message; whether it existed.
-- $1 queue TEXT, $2 msg_id BIGINT
SELECT pgmq.archive($1::text, $2::bigint) AS archived

-- name: pgmq_archive_batch
-- Archives messages; the msg_ids archived.
-- $1 queue TEXT, $2 msg_ids BIGINT[]
SELECT a.msg_id FROM pgmq.archive($1::text, $2::bigint[]) AS a(msg_id)

-- name: pgmq_set_vt
-- Sets a message's visibility timeout to vt seconds from now.
-- $1 queue TEXT, $2 msg_id BIGINT, $3 vt_seconds INT
SELECT msg_id FROM pgmq.set_vt($1::text, $2::bigint, $3::int)

-- name: queue_message_counts
-- Messages in a queue: all of them, and those visible now (no lease, no backoff pending).
-- queue_visible_length came with PGMQ 1.5; with an older PGMQ `visible` is NULL.
-- $1 queue TEXT
SELECT m.queue_length AS total, (to_jsonb(m) ->> 'queue_visible_length')::bigint AS visible
FROM pgmq.metrics($1::text) AS m
