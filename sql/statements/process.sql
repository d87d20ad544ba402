-- Process managers: process rows, their step audit (process_audit), WAITING_FOR_TSQ.

-- name: process_insert
-- ProcessRepository.save: inserts a process row as given.
-- $1 domain TEXT, $2 process_id UUID, $3 process_type TEXT, $4 status TEXT,
-- $5 current_step TEXT, $6 state JSONB, $7 error_code TEXT, $8 error_message TEXT,
-- $9 created_at TIMESTAMPTZ, $10 updated_at TIMESTAMPTZ, $11 completed_at TIMESTAMPTZ,
-- $12 batch_id UUID
INSERT INTO commandbus.process (
    domain, process_id, process_type, status, current_step, state, error_code, error_message,
    created_at, updated_at, completed_at, batch_id)
VALUES ($1::text, $2::uuid, $3::text, $4::text, $5::text, $6::jsonb, $7::text, $8::text,
        $9::timestamptz, $10::timestamptz, $11::timestamptz, $12::uuid)

-- name: process_update
-- ProcessRepository.update: a process row's status, step, state, error and completion time
-- (updated_at = now()).
-- $1 domain TEXT, $2 process_id UUID, $3 status TEXT, $4 current_step TEXT, $5 state JSONB,
-- $6 error_code TEXT, $7 error_message TEXT, $8 completed_at TIMESTAMPTZ
UPDATE commandbus.process
SET status = $3::text, current_step = $4::text, state = $5::jsonb, error_code = $6::text,
    error_message = $7::text, updated_at = now(), completed_at = $8::timestamptz
WHERE domain = $1::text AND process_id = $2::uuid

-- name: process_get
-- One process row.
-- $1 domain TEXT, $2 process_id UUID
SELECT domain, process_id, process_type, status, current_step, state, error_code, error_message,
       created_at, updated_at, completed_at, batch_id
FROM commandbus.process
WHERE domain = $1::text AND process_id = $2::uuid

-- name: process_lock
-- Locks one process row for the caller's transaction (the reply router: one reply of a process
-- at a time); whether it exists.
-- $1 domain TEXT, $2 process_id UUID
SELECT process_id FROM commandbus.process
WHERE domain = $1::text AND process_id = $2::uuid
FOR UPDATE

-- name: process_find_by_status
-- A domain's processes in any of the given statuses, oldest first.
-- $1 domain TEXT, $2 statuses TEXT[]
SELECT domain, process_id, process_type, status, current_step, state, error_code, error_message,
       created_at, updated_at, completed_at, batch_id
FROM commandbus.process
WHERE domain = $1::text AND status = ANY ($2::text[])
ORDER BY created_at, process_id

-- name: process_audit_insert
-- ProcessRepository.log_step: one step's row (a command sent for the process).
-- $1 domain TEXT, $2 process_id UUID, $3 step_name TEXT, $4 command_id UUID,
-- $5 command_type TEXT, $6 command_data JSONB, $7 sent_at TIMESTAMPTZ, $8 reply_outcome TEXT,
-- $9 reply_data JSONB, $10 received_at TIMESTAMPTZ
INSERT INTO commandbus.process_audit (
    domain, process_id, step_name, command_id, command_type, command_data, sent_at,
    reply_outcome, reply_data, received_at)
VALUES ($1::text, $2::uuid, $3::text, $4::uuid, $5::text, $6::jsonb, $7::timestamptz, $8::text,
        $9::jsonb, $10::timestamptz)

-- name: process_audit_reply
-- ProcessRepository.update_step_reply: records a step's reply once. Only a row without a reply
-- yet is updated, so a reply delivered twice matches nothing the second time (the fence of
-- exactly-once advancement); returns the step names updated.
-- $1 domain TEXT, $2 process_id UUID, $3 command_id UUID, $4 reply_outcome TEXT,
-- $5 reply_data JSONB, $6 received_at TIMESTAMPTZ
UPDATE commandbus.process_audit
SET reply_outcome = $4::text, reply_data = $5::jsonb, received_at = $6::timestamptz
WHERE domain = $1::text AND process_id = $2::uuid AND command_id = $3::uuid
  AND reply_outcome IS NULL
RETURNING step_name

-- name: process_audit_list
-- A process's steps in the order they were written (id: sent_at comes from the client).
-- $1 domain TEXT, $2 process_id UUID
SELECT step_name, command_id, command_type, command_data, sent_at, reply_outcome, reply_data,
       received_at
FROM commandbus.process_audit
WHERE domain = $1::text AND process_id = $2::uuid
ORDER BY id

-- name: process_completed_steps
-- The names of a process's steps whose reply was SUCCESS, in the order they were sent.
-- $1 domain TEXT, $2 process_id UUID
SELECT step_name
FROM commandbus.process_audit
WHERE domain = $1::text AND process_id = $2::uuid AND reply_outcome = 'SUCCESS'
ORDER BY id

-- name: process_tsq_sync
-- Puts processes whose pending step's command is in the TSQ into WAITING_FOR_TSQ and those
-- whose command left it back to waiting (process_tsq_sync_v1); how many changed.
-- $1 domain TEXT, $2 command_ids UUID[]
SELECT commandbus.process_tsq_sync_v1($1::text, $2::uuid[]) AS changed
