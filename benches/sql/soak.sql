-- The queries of benches/soak.py (the format of sql/statements/).

-- name: soak_completed
-- How many of a domain's commands are COMPLETED.
-- $1 domain TEXT
SELECT count(*) FROM commandbus.command WHERE domain = $1::text AND status = 'COMPLETED'

-- name: soak_audit_completed
-- How many COMPLETED audit rows a domain has.
-- $1 domain TEXT
SELECT count(*) FROM commandbus.audit WHERE domain = $1::text AND event_type = 'COMPLETED'
