-- The worker's hot path: the claim in two steps, the flush of outcomes, leases. Each
-- statement calls one protocol function of sql/migrations/ (see there for what it does).

-- name: lease_messages
-- Step 1 of the engine's claim: leases up to qty visible messages for vt seconds; the
-- transaction commits without waiting for the disk (see lease_messages_v1).
-- $1 domain TEXT, $2 vt_seconds INT, $3 qty INT
SELECT commandbus.lease_messages_v1($1::text, $2::int, $3::int, true) AS msg_ids

-- name: claim_leased
-- Step 2 of the engine's claim: claims the commands of the leased messages; created_at as
-- microseconds since the epoch and data as JSON text, for the engine's decoder.
-- $1 domain TEXT, $2 msg_ids BIGINT[], $3 default_max_attempts INT
SELECT msg_id, attempt, max_attempts, command_id, command_type, data::text AS data, correlation_id, reply_to, batch_id, (extract(epoch FROM created_at) * 1000000)::bigint AS created_at_us FROM commandbus.claim_leased_v1($1::text, $2::bigint[], $3::int)

-- name: finish_commands
-- The flush of handler outcomes of one domain (finish_commands_v1).
-- $1 domain TEXT, $2 command_ids UUID[], $3 msg_ids BIGINT[], $4 attempts INT[],
-- $5 outcomes TEXT[], $6 results JSONB[], $7 error_types TEXT[], $8 error_codes TEXT[],
-- $9 error_msgs TEXT[], $10 error_details JSONB[], $11 backoffs INT[],
-- $12 default_max_attempts INT, $13 created_at_us BIGINT[] (each command's created_at as the
-- claim returned it: its partition)
SELECT command_id, status FROM commandbus.finish_commands_v1($1::text, $2::uuid[], $3::bigint[], $4::int[], $5::text[], $6::jsonb[], $7::text[], $8::text[], $9::text[], $10::jsonb[], $11::int[], $12::int, $13::bigint[])

-- name: complete_commands
-- The flush of outcomes that are all SUCCESS (complete_commands_v1).
-- $1 domain TEXT, $2 command_ids UUID[], $3 msg_ids BIGINT[], $4 attempts INT[],
-- $5 results JSONB[], $6 created_at_us BIGINT[] (as in finish_commands)
SELECT command_id, status FROM commandbus.complete_commands_v1($1::text, $2::uuid[], $3::bigint[], $4::int[], $5::jsonb[], $6::bigint[])

-- name: extend_leases
-- Pushes the visibility of leased messages forward, fenced by (msg_id, attempt).
-- $1 domain TEXT, $2 command_ids UUID[], $3 msg_ids BIGINT[], $4 attempts INT[], $5 seconds INT,
-- $6 created_at_us BIGINT[] (as in finish_commands)
SELECT commandbus.extend_leases_v1($1::text, $2::uuid[], $3::bigint[], $4::int[], $5::int, $6::bigint[]) AS extended

-- name: release_commands
-- Gives claimed but unstarted messages back (graceful stop), fenced by (msg_id, attempt).
-- $1 domain TEXT, $2 command_ids UUID[], $3 msg_ids BIGINT[], $4 attempts INT[],
-- $5 created_at_us BIGINT[] (as in finish_commands)
SELECT commandbus.release_commands_v1($1::text, $2::uuid[], $3::bigint[], $4::int[], $5::bigint[]) AS released

-- name: refresh_statistics
-- Analyzes the command table once if it never was (at worker start).
-- No parameters.
SELECT commandbus.refresh_statistics_v1() AS analyzed

-- name: set_statement_timeout
-- Run on each new connection of the Rust engine: the server cancels a statement of the engine
-- after this long (three call deadlines), so a backend whose client gave up on it (abandoned
-- at its deadline while waiting on a lock, say) does not hold a connection slot for long. A
-- SET rather than a startup parameter: connection poolers (pgbouncer) refuse unknown ones.
-- $1 milliseconds TEXT
SELECT set_config('statement_timeout', $1::text, false)
