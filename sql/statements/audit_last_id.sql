-- The newest audit row's id (0 when there is none): a mark to find what happened after it.
SELECT coalesce(max(audit_id), 0)::bigint AS last_id FROM commandbus.audit
