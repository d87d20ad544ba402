-- The troubleshooting queue (TSQ): listings and operator actions. TSQ filters say
-- `in_tsq AND status = 'IN_TROUBLESHOOTING_QUEUE'` so they can use the partial index
-- ix_command_tsq.

-- name: tsq_list
-- A domain's TSQ commands (of one type, or all when command_type is NULL) with their archived
-- message, most recently updated first, one page.
-- $1 domain TEXT, $2 command_type TEXT, $3 limit INT, $4 offset INT
SELECT c.domain, c.command_id, c.command_type, c.attempts, c.max_attempts, c.last_error_type,
       c.last_error_code, c.last_error_msg, c.correlation_id, nullif(c.reply_queue, '') AS reply_to,
       commandbus.tsq_archived_message_v1(c.domain, c.msg_id) AS payload, c.created_at, c.updated_at
FROM commandbus.command c
WHERE c.domain = $1::text
  AND c.in_tsq AND c.status = 'IN_TROUBLESHOOTING_QUEUE'
  AND ($2::text IS NULL OR c.command_type = $2::text)
ORDER BY c.updated_at DESC, c.command_id
LIMIT $3::int OFFSET $4::int

-- name: tsq_list_all
-- The TSQ commands of one domain, or of all when domain is NULL, with their archived message,
-- most recently updated first, one page.
-- $1 domain TEXT, $2 limit INT, $3 offset INT
SELECT c.domain, c.command_id, c.command_type, c.attempts, c.max_attempts, c.last_error_type,
       c.last_error_code, c.last_error_msg, c.correlation_id, nullif(c.reply_queue, '') AS reply_to,
       commandbus.tsq_archived_message_v1(c.domain, c.msg_id) AS payload, c.created_at, c.updated_at
FROM commandbus.command c
WHERE c.in_tsq AND c.status = 'IN_TROUBLESHOOTING_QUEUE'
  AND ($1::text IS NULL OR c.domain = $1::text)
ORDER BY c.updated_at DESC, c.command_id
LIMIT $2::int OFFSET $3::int

-- name: tsq_count
-- How many commands of a domain (of one type, or all when command_type is NULL) are in the TSQ.
-- $1 domain TEXT, $2 command_type TEXT
SELECT count(*) AS n
FROM commandbus.command
WHERE domain = $1::text
  AND in_tsq AND status = 'IN_TROUBLESHOOTING_QUEUE'
  AND ($2::text IS NULL OR command_type = $2::text)

-- name: tsq_domains
-- The domains that have commands in the TSQ.
-- No parameters.
SELECT DISTINCT domain
FROM commandbus.command
WHERE in_tsq AND status = 'IN_TROUBLESHOOTING_QUEUE'
ORDER BY domain

-- name: tsq_command_ids
-- The ids of the TSQ commands of one domain, or of all when domain is NULL, newest first.
-- $1 domain TEXT
SELECT command_id
FROM commandbus.command
WHERE in_tsq AND status = 'IN_TROUBLESHOOTING_QUEUE'
  AND ($1::text IS NULL OR domain = $1::text)
ORDER BY created_at DESC, command_id

-- name: tsq_command_domain
-- The domain of a command id (one where it is in the TSQ, when there are several).
-- $1 command_id UUID
SELECT domain
FROM commandbus.command
WHERE command_id = $1::uuid
ORDER BY (status = 'IN_TROUBLESHOOTING_QUEUE') DESC, domain
LIMIT 1

-- name: tsq_retry
-- Operator retry of one TSQ command (tsq_retry_v1); the new msg_id.
-- $1 domain TEXT, $2 command_id UUID, $3 operator TEXT
SELECT commandbus.tsq_retry_v1($1::text, $2::uuid, $3::text) AS msg_id

-- name: tsq_cancel
-- Operator cancel of one TSQ command (tsq_cancel_v1).
-- $1 domain TEXT, $2 command_id UUID, $3 reason TEXT, $4 operator TEXT
SELECT commandbus.tsq_cancel_v1($1::text, $2::uuid, $3::text, $4::text)

-- name: tsq_complete
-- Operator completion of one TSQ command (tsq_complete_v1).
-- $1 domain TEXT, $2 command_id UUID, $3 result JSONB, $4 operator TEXT
SELECT commandbus.tsq_complete_v1($1::text, $2::uuid, $3::jsonb, $4::text)

-- name: tsq_retry_all
-- One chunk of a bulk retry (tsq_retry_all_v1): call again with the returned cutoff and
-- last_command_id until examined = 0.
-- $1 domain TEXT, $2 command_type TEXT, $3 operator TEXT, $4 limit INT, $5 cutoff TIMESTAMPTZ,
-- $6 after_command_id UUID
SELECT examined, affected, cutoff, last_command_id
FROM commandbus.tsq_retry_all_v1($1::text, $2::text, $3::text, $4::int, $5::timestamptz, $6::uuid)

-- name: tsq_cancel_all
-- One chunk of a bulk cancel (tsq_cancel_all_v1); the same paging as tsq_retry_all.
-- $1 domain TEXT, $2 reason TEXT, $3 command_type TEXT, $4 operator TEXT, $5 limit INT,
-- $6 cutoff TIMESTAMPTZ, $7 after_command_id UUID
SELECT examined, affected, cutoff, last_command_id
FROM commandbus.tsq_cancel_all_v1($1::text, $2::text, $3::text, $4::text, $5::int, $6::timestamptz, $7::uuid)
