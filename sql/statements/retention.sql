-- Retention: pruning terminal commands and complete batches.

-- name: retention_cutoff
-- The server's now() minus the given age.
-- $1 older_than INTERVAL
SELECT now() - $1::interval AS cutoff

-- name: retention_prune
-- One chunk of pruning (prune_v2): call until commands, batches and messages are all 0, each
-- call with the last_created_at of the call before (NULL the first time).
-- $1 cutoff TIMESTAMPTZ, $2 domain TEXT, $3 chunk INT, $4 after TIMESTAMPTZ
SELECT commands, audit_events, payloads, messages, batches, last_created_at FROM commandbus.prune_v2($1::timestamptz, $2::text, $3::int, $4::timestamptz)

-- name: retention_drop_partition
-- Drops the oldest day partition of the audit trail ('commandbus.audit') or of the commands
-- ('commandbus.command') that ends before the cutoff and that retention may drop whole
-- (drop_day_partition_v1): call until dropped is NULL.
-- $1 table REGCLASS, $2 cutoff TIMESTAMPTZ, $3 domain TEXT (NULL: every domain)
SELECT dropped, est_rows, kept FROM commandbus.drop_day_partition_v1($1::text::regclass, $2::timestamptz, $3::text)

-- name: retention_rotate_keys
-- Turns the command_id reservations over when due at this cutoff (rotate_command_keys_v1).
-- $1 cutoff TIMESTAMPTZ
SELECT commandbus.rotate_command_keys_v1($1::timestamptz) AS rotated

-- name: partitions_ensure
-- Creates the day partitions (UTC) of the audit trail and of the commands from yesterday to $1
-- days ahead that are missing; the number created.
-- $1 days_ahead INT
SELECT sum(commandbus.ensure_day_partitions_v1(t, ((now() AT TIME ZONE 'UTC') - interval '1 day')::date, ((now() AT TIME ZONE 'UTC') + make_interval(days => $1::int))::date))::int AS created
FROM unnest(ARRAY['commandbus.audit'::regclass, 'commandbus.command'::regclass]) AS t
