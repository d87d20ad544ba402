-- Command rows: lookups, queries, and CommandRepository (the predecessor's repository API,
-- one command at a time; the bus and the worker do not use it).

-- name: get_command
-- The command row of one domain's command.
-- $1 domain TEXT, $2 command_id UUID
SELECT domain, command_id, command_type, status, attempts, max_attempts, msg_id, correlation_id,
       nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code, last_error_msg,
       created_at, updated_at, batch_id, result
FROM commandbus.command
WHERE domain = $1::text AND command_id = $2::uuid

-- name: command_exists
-- Whether a domain's command exists.
-- $1 domain TEXT, $2 command_id UUID
SELECT EXISTS (SELECT 1 FROM commandbus.command WHERE domain = $1::text AND command_id = $2::uuid) AS found

-- name: query_commands
-- Commands matching the filters (each NULL: any), newest first, one page.
-- $1 status TEXT, $2 domain TEXT, $3 command_type TEXT, $4 created_after TIMESTAMPTZ,
-- $5 created_before TIMESTAMPTZ, $6 limit INT, $7 offset INT
SELECT domain, command_id, command_type, status, attempts, max_attempts, msg_id, correlation_id,
       nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code, last_error_msg,
       created_at, updated_at, batch_id, result
FROM commandbus.command
WHERE ($1::text IS NULL OR status = $1::text)
  AND ($2::text IS NULL OR domain = $2::text)
  AND ($3::text IS NULL OR command_type = $3::text)
  AND ($4::timestamptz IS NULL OR created_at >= $4::timestamptz)
  AND ($5::timestamptz IS NULL OR created_at <= $5::timestamptz)
ORDER BY created_at DESC, command_id
LIMIT $6::int OFFSET $7::int

-- name: repo_command_insert
-- CommandRepository.save_batch: inserts command rows (a command_id already reserved, or
-- repeated in the input, is skipped: reserve_command_ids_v1); the ids inserted. reply_queue
-- NULL stores ''; created_at / updated_at NULL: now().
-- $1 domains TEXT[], $2 queue_names TEXT[], $3 msg_ids BIGINT[], $4 command_ids UUID[],
-- $5 command_types TEXT[], $6 statuses TEXT[], $7 attempts INT[], $8 max_attempts INT[],
-- $9 correlation_ids UUID[], $10 reply_queues TEXT[], $11 created_ats TIMESTAMPTZ[],
-- $12 updated_ats TIMESTAMPTZ[], $13 batch_ids UUID[]
WITH r AS MATERIALIZED (
    SELECT r.domain, r.command_id FROM commandbus.reserve_command_ids_v1($1::text[], $4::uuid[]) r
)
INSERT INTO commandbus.command AS c (
    domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts,
    correlation_id, reply_queue, created_at, updated_at, batch_id)
SELECT DISTINCT ON (t.domain, t.command_id)
       t.domain, t.queue_name, t.msg_id, t.command_id, t.command_type, t.status, t.attempts,
       t.max_attempts, t.correlation_id, coalesce(t.reply_queue, ''), coalesce(t.created_at, now()),
       coalesce(t.updated_at, now()), t.batch_id
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::int[],
            $8::int[], $9::uuid[], $10::text[], $11::timestamptz[], $12::timestamptz[], $13::uuid[])
     WITH ORDINALITY AS t(domain, queue_name, msg_id, command_id, command_type, status, attempts,
                          max_attempts, correlation_id, reply_queue, created_at, updated_at, batch_id, o)
WHERE (t.domain, t.command_id) IN (SELECT r.domain, r.command_id FROM r)
ORDER BY t.domain, t.command_id, t.o
RETURNING c.command_id

-- name: repo_command_existing
-- The command_ids among the given ones that exist in the domain.
-- $1 domain TEXT, $2 command_ids UUID[]
SELECT command_id FROM commandbus.command WHERE domain = $1::text AND command_id = ANY ($2::uuid[])

-- name: repo_command_update_status
-- Sets a command's status.
-- $1 domain TEXT, $2 command_id UUID, $3 status TEXT
UPDATE commandbus.command SET status = $3::text, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid

-- name: repo_command_update_msg_id
-- Sets a command's msg_id.
-- $1 domain TEXT, $2 command_id UUID, $3 msg_id BIGINT
UPDATE commandbus.command SET msg_id = $3::bigint, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid

-- name: repo_command_increment_attempts
-- Counts an attempt; the new attempts.
-- $1 domain TEXT, $2 command_id UUID
UPDATE commandbus.command SET attempts = attempts + 1, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid
RETURNING attempts

-- name: repo_command_receive
-- Counts an attempt and sets the status of a command that is not COMPLETED or CANCELED;
-- the command row.
-- $1 domain TEXT, $2 command_id UUID, $3 status TEXT
UPDATE commandbus.command
SET attempts = attempts + 1, status = $3::text, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid AND status NOT IN ('COMPLETED', 'CANCELED')
RETURNING domain, command_id, command_type, status, attempts, max_attempts, msg_id, correlation_id,
          nullif(reply_queue, '') AS reply_to, last_error_type, last_error_code, last_error_msg,
          created_at, updated_at, batch_id, result

-- name: repo_command_update_error
-- Sets a command's last error.
-- $1 domain TEXT, $2 command_id UUID, $3 error_type TEXT, $4 error_code TEXT, $5 error_msg TEXT
UPDATE commandbus.command
SET last_error_type = $3::text, last_error_code = $4::text, last_error_msg = $5::text, updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid

-- name: repo_command_finish
-- Sets a command's final status and, where given (not NULL), its last error.
-- $1 domain TEXT, $2 command_id UUID, $3 status TEXT, $4 error_type TEXT, $5 error_code TEXT,
-- $6 error_msg TEXT
UPDATE commandbus.command
SET status = $3::text,
    last_error_type = coalesce($4::text, last_error_type),
    last_error_code = coalesce($5::text, last_error_code),
    last_error_msg = coalesce($6::text, last_error_msg),
    updated_at = now()
WHERE domain = $1::text AND command_id = $2::uuid

-- name: repo_sp_receive_command
-- The predecessor's sp_receive_command: counts an attempt and sets the status of a command
-- that is not COMPLETED or CANCELED, writes a RECEIVED audit row and starts its batch
-- (BATCH_STARTED); the command row (msg_id / max_attempts overridden where given).
-- $1 domain TEXT, $2 command_id UUID, $3 status TEXT, $4 msg_id BIGINT, $5 max_attempts INT
WITH upd AS (
    UPDATE commandbus.command c
    SET attempts = c.attempts + 1, status = $3::text, updated_at = now()
    WHERE c.domain = $1::text AND c.command_id = $2::uuid AND c.status NOT IN ('COMPLETED', 'CANCELED')
    RETURNING c.*
), aud AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT u.domain, u.command_id, 'RECEIVED', jsonb_build_object(
               'msg_id', coalesce($4::bigint, u.msg_id), 'attempt', u.attempts,
               'max_attempts', coalesce($5::int, u.max_attempts))
    FROM upd u
), bst AS (
    UPDATE commandbus.batch b
    SET status = 'IN_PROGRESS', started_at = coalesce(b.started_at, now())
    FROM upd u
    WHERE b.domain = u.domain AND b.batch_id = u.batch_id AND b.status = 'PENDING'
    RETURNING b.domain, b.batch_id
), bsa AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT s.domain, s.batch_id, 'BATCH_STARTED', jsonb_build_object('batch_id', s.batch_id)
    FROM bst s
)
SELECT u.domain, u.command_id, u.command_type, u.status, u.attempts,
       coalesce($5::int, u.max_attempts) AS max_attempts, coalesce($4::bigint, u.msg_id) AS msg_id,
       u.correlation_id, nullif(u.reply_queue, '') AS reply_to, u.last_error_type,
       u.last_error_code, u.last_error_msg, u.created_at, u.updated_at, u.batch_id, u.result
FROM upd u

-- name: repo_sp_finish_command
-- The predecessor's sp_finish_command: sets a command's final status and, where given, its
-- last error, writes an audit row of the given event type, and moves its batch's counters by the
-- status change (apply_batch_delta_v1); whether the batch completed.
-- $1 domain TEXT, $2 command_id UUID, $3 status TEXT, $4 event_type TEXT, $5 error_type TEXT,
-- $6 error_code TEXT, $7 error_msg TEXT, $8 details JSONB, $9 batch_id UUID
WITH cur AS (
    SELECT c.status AS old_status
    FROM commandbus.command c
    WHERE c.domain = $1::text AND c.command_id = $2::uuid
    FOR UPDATE
), upd AS (
    UPDATE commandbus.command c
    SET status = $3::text,
        last_error_type = coalesce($5::text, c.last_error_type),
        last_error_code = coalesce($6::text, c.last_error_code),
        last_error_msg = coalesce($7::text, c.last_error_msg),
        updated_at = now()
    FROM cur
    WHERE c.domain = $1::text AND c.command_id = $2::uuid AND cur.old_status <> $3::text
    RETURNING cur.old_status, c.status AS new_status
), aud AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    VALUES ($1::text, $2::uuid, $4::text, $8::jsonb)
)
SELECT coalesce((
    SELECT commandbus.apply_batch_delta_v1($1::text, $9::uuid,
               (u.new_status = 'COMPLETED')::int - (u.old_status = 'COMPLETED')::int,
               (u.new_status = 'FAILED')::int - (u.old_status = 'FAILED')::int,
               (u.new_status = 'CANCELED')::int - (u.old_status = 'CANCELED')::int,
               (u.new_status = 'IN_TROUBLESHOOTING_QUEUE')::int
                   - (u.old_status = 'IN_TROUBLESHOOTING_QUEUE')::int)
    FROM upd u
    WHERE $9::uuid IS NOT NULL), false) AS batch_complete

-- name: repo_sp_fail_command
-- The predecessor's sp_fail_command: records a command's error and writes a FAILED audit
-- row; whether the command exists.
-- $1 domain TEXT, $2 command_id UUID, $3 error_type TEXT, $4 error_code TEXT, $5 error_msg TEXT,
-- $6 attempt INT, $7 max_attempts INT, $8 msg_id BIGINT
WITH upd AS (
    UPDATE commandbus.command c
    SET last_error_type = $3::text, last_error_code = $4::text, last_error_msg = $5::text,
        updated_at = now()
    WHERE c.domain = $1::text AND c.command_id = $2::uuid
    RETURNING c.command_id
), aud AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT $1::text, u.command_id, 'FAILED', jsonb_build_object(
               'msg_id', $8::bigint, 'attempt', $6::int, 'max_attempts', $7::int,
               'error_type', $3::text, 'error_code', $4::text, 'error_msg', $5::text)
    FROM upd u
)
SELECT EXISTS (SELECT 1 FROM upd) AS found

-- name: commands_claimed_since
-- The commands of a domain claimed by a worker (or sorted into the troubleshooting queue when
-- claimed: poison, malformed) after an audit row, in the order they were sent (drain_queue).
-- $1 domain TEXT, $2 after_audit_id BIGINT
SELECT c.command_id
FROM commandbus.command c
WHERE c.domain = $1::text
  AND c.command_id IN (
      SELECT a.command_id FROM commandbus.audit a
      WHERE a.audit_id > $2::bigint AND a.domain = $1::text
        AND a.event_type IN ('RECEIVED', 'MOVED_TO_TSQ'))
ORDER BY c.created_at, c.msg_id NULLS LAST, c.command_id
