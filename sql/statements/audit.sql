-- The audit trail.

-- name: audit_trail
-- A command's audit rows in order (of one domain, or of all when domain is NULL).
-- $1 command_id UUID, $2 domain TEXT
SELECT audit_id, domain, command_id, event_type, ts, details_json
FROM commandbus.audit
WHERE command_id = $1::uuid AND ($2::text IS NULL OR domain = $2::text)
ORDER BY ts, audit_id

-- name: repo_audit_insert
-- AuditLogger: inserts audit rows.
-- $1 domains TEXT[], $2 command_ids UUID[], $3 event_types TEXT[], $4 details JSONB[]
INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
SELECT t.domain, t.command_id, t.event_type, t.details
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::jsonb[]) AS t(domain, command_id, event_type, details)

-- name: audit_last_id
-- The newest audit row's id (0 when there is none): a mark to find what happened after it
-- (drain_queue).
-- No parameters.
SELECT coalesce(max(audit_id), 0)::bigint AS last_id FROM commandbus.audit
