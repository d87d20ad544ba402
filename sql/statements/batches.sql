-- Batches: creation, lookups, counters, completion notifications.

-- name: batch_create
-- Creates a batch and sends its commands (create_batch_v2).
-- $1 domain TEXT, $2 batch_id UUID, $3 batch_type TEXT, $4 name TEXT, $5 custom_data JSONB,
-- $6 command_ids UUID[], $7 command_types TEXT[], $8 messages JSONB[], $9 correlation_ids UUID[],
-- $10 reply_tos TEXT[], $11 max_attempts INT[]
SELECT command_id, msg_id, correlation_id FROM commandbus.create_batch_v2($1::text, $2::uuid, $3::text, $4::text, $5::jsonb, $6::uuid[], $7::text[], $8::jsonb[], $9::uuid[], $10::text[], $11::int[])

-- name: batch_save
-- BatchRepository.save: inserts a batch row as given.
-- $1 domain TEXT, $2 batch_id UUID, $3 batch_type TEXT, $4 name TEXT, $5 custom_data JSONB,
-- $6 status TEXT, $7 total_count INT, $8 completed_count INT, $9 failed_count INT,
-- $10 canceled_count INT, $11 in_troubleshooting_count INT, $12 created_at TIMESTAMPTZ,
-- $13 started_at TIMESTAMPTZ, $14 completed_at TIMESTAMPTZ
INSERT INTO commandbus.batch (
    domain, batch_id, batch_type, name, custom_data, status, total_count, completed_count,
    failed_count, canceled_count, in_troubleshooting_count, created_at, started_at, completed_at)
VALUES ($1::text, $2::uuid, $3::text, $4::text, $5::jsonb, $6::text, $7::int, $8::int, $9::int,
        $10::int, $11::int, $12::timestamptz, $13::timestamptz, $14::timestamptz)

-- name: batch_get
-- The batch row of one domain's batch.
-- $1 domain TEXT, $2 batch_id UUID
SELECT domain, batch_id, batch_type, name, custom_data, status, total_count, completed_count,
       failed_count, canceled_count, in_troubleshooting_count, created_at, started_at, completed_at
FROM commandbus.batch
WHERE domain = $1::text AND batch_id = $2::uuid

-- name: batch_get_many
-- The batch rows of the given (domain, batch_id) pairs.
-- $1 domains TEXT[], $2 batch_ids UUID[]
SELECT b.domain, b.batch_id, b.batch_type, b.name, b.custom_data, b.status, b.total_count,
       b.completed_count, b.failed_count, b.canceled_count, b.in_troubleshooting_count,
       b.created_at, b.started_at, b.completed_at
FROM unnest($1::text[], $2::uuid[]) AS k(domain, batch_id)
JOIN commandbus.batch b ON b.domain = k.domain AND b.batch_id = k.batch_id

-- name: batch_exists
-- Whether a domain's batch exists.
-- $1 domain TEXT, $2 batch_id UUID
SELECT EXISTS (SELECT 1 FROM commandbus.batch WHERE domain = $1::text AND batch_id = $2::uuid) AS found

-- name: batch_list
-- A domain's batches (of one status, or all when status is NULL), newest first, one page.
-- waiting_for_operator TRUE keeps only the batches whose remaining commands all wait in the
-- TSQ (BatchMetadata.waiting_for_operator: some in the TSQ, and completed + failed + canceled +
-- in TSQ reaches the total), FALSE only the others, NULL does not filter. The rows are found by
-- domain (ix_batch_created, newest first; ix_batch_status with a status) and the counters are
-- checked on each: there is deliberately no index on the counters, which every flush of a
-- batch's commands moves (an index on them would make each of those row updates an index
-- write, not an in-place one).
-- $1 domain TEXT, $2 status TEXT, $3 limit INT, $4 offset INT, $5 waiting_for_operator BOOLEAN
SELECT domain, batch_id, batch_type, name, custom_data, status, total_count, completed_count,
       failed_count, canceled_count, in_troubleshooting_count, created_at, started_at, completed_at
FROM commandbus.batch
WHERE domain = $1::text AND ($2::text IS NULL OR status = $2::text)
  AND ($5::boolean IS NULL
       OR (in_troubleshooting_count > 0
           AND completed_count + failed_count + canceled_count + in_troubleshooting_count
               >= total_count) = $5::boolean)
ORDER BY created_at DESC, batch_id
LIMIT $3::int OFFSET $4::int

-- name: batch_list_commands
-- A batch's commands (of one status, or all when status is NULL), in sending order, one page.
-- $1 domain TEXT, $2 batch_id UUID, $3 status TEXT, $4 limit INT, $5 offset INT
SELECT domain, command_id, command_type, status, attempts, max_attempts, msg_id, correlation_id,
       nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code, last_error_msg,
       created_at, updated_at, batch_id, result
FROM commandbus.command
WHERE domain = $1::text AND batch_id = $2::uuid AND ($3::text IS NULL OR status = $3::text)
ORDER BY created_at, msg_id, command_id
LIMIT $4::int OFFSET $5::int

-- name: batch_apply_delta
-- Moves a batch's counters (apply_batch_delta_v1); whether the batch completed.
-- $1 domain TEXT, $2 batch_id UUID, $3 completed INT, $4 failed INT, $5 canceled INT,
-- $6 in_troubleshooting INT
SELECT commandbus.apply_batch_delta_v1($1::text, $2::uuid, $3::int, $4::int, $5::int, $6::int) AS completed

-- name: batch_refresh_stats
-- Recomputes a batch's counters from its commands (refresh_batch_stats_v1); whether the
-- batch completed.
-- $1 domain TEXT, $2 batch_id UUID
SELECT commandbus.refresh_batch_stats_v1($1::text, $2::uuid) AS completed

-- name: batch_listen
-- Subscribes the connection to batch completions (NOTIFY commandbus_batch
-- '<domain>:<batch_id>', sent by apply_batch_delta_v1).
-- No parameters.
LISTEN commandbus_batch
