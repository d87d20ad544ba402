WITH upd AS (
    UPDATE commandbus.command c
    SET last_error_type = $3::text, last_error_code = $4::text, last_error_msg = $5::text,
        updated_at = now()
    WHERE c.domain = $1::text AND c.command_id = $2::uuid
    RETURNING c.command_id
), aud AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT $1::text, u.command_id, 'FAILED', jsonb_build_object(
               'msg_id', $8::bigint, 'attempt', $6::int, 'max_attempts', $7::int,
               'error_type', $3::text, 'error_code', $4::text, 'error_msg', $5::text)
    FROM upd u
)
SELECT EXISTS (SELECT 1 FROM upd) AS found
