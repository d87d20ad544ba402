INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
SELECT t.domain, t.command_id, t.event_type, t.details
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::jsonb[]) AS t(domain, command_id, event_type, details)
