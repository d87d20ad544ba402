SELECT audit_id, domain, command_id, event_type, ts, details_json
FROM commandbus.audit
WHERE command_id = $1::uuid AND ($2::text IS NULL OR domain = $2::text)
ORDER BY ts, audit_id
