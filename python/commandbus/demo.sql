-- The queries of `python -m commandbus demo` (read by cli/demo.py; the format of sql/statements/).

-- name: demo_clock
-- The server's clock, when the demo starts.
-- No parameters.
SELECT clock_timestamp()

-- name: demo_statuses
-- How many of the demo's commands are in each status.
-- $1 domain TEXT, $2 command_ids UUID[]
SELECT status, count(*) FROM commandbus.command WHERE domain = $1::text AND command_id = ANY ($2::uuid[]) GROUP BY status ORDER BY status

-- name: demo_completed_since
-- How many of a domain's commands completed since the start.
-- $1 started_at TIMESTAMPTZ, $2 domain TEXT
SELECT count(*) FROM commandbus.command WHERE updated_at >= $1::timestamptz AND domain = $2::text AND status = 'COMPLETED'

-- name: demo_last_done
-- Seconds from the start to the last update of the demo's commands.
-- $1 started_at TIMESTAMPTZ, $2 domain TEXT, $3 command_ids UUID[]
SELECT extract(epoch FROM max(updated_at) - $1::timestamptz) FROM commandbus.command WHERE domain = $2::text AND command_id = ANY ($3::uuid[])

-- name: demo_audit_completed
-- COMPLETED audit rows of the demo's commands, and how many commands they name.
-- $1 domain TEXT, $2 command_ids UUID[]
SELECT count(*), count(DISTINCT command_id) FROM commandbus.audit WHERE domain = $1::text AND event_type = 'COMPLETED' AND command_id = ANY ($2::uuid[])
