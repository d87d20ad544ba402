-- Retention: pruning terminal commands and complete batches.

-- name: retention_cutoff
-- The server's now() minus the given age.
-- $1 older_than INTERVAL
SELECT now() - $1::interval AS cutoff

-- name: retention_prune
-- One chunk of pruning (prune_v1): call until commands and batches are both 0.
-- $1 cutoff TIMESTAMPTZ, $2 domain TEXT, $3 chunk INT
SELECT commands, audit_events, payloads, messages, batches FROM commandbus.prune_v1($1::timestamptz, $2::text, $3::int)
