WITH cur AS (
    SELECT c.status AS old_status
    FROM commandbus.command c
    WHERE c.domain = $1::text AND c.command_id = $2::uuid
    FOR UPDATE
), upd AS (
    UPDATE commandbus.command c
    SET status = $3::text,
        last_error_type = coalesce($5::text, c.last_error_type),
        last_error_code = coalesce($6::text, c.last_error_code),
        last_error_msg = coalesce($7::text, c.last_error_msg),
        updated_at = now()
    FROM cur
    WHERE c.domain = $1::text AND c.command_id = $2::uuid AND cur.old_status <> $3::text
    RETURNING cur.old_status, c.status AS new_status
), aud AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    VALUES ($1::text, $2::uuid, $4::text, $8::jsonb)
)
SELECT coalesce((
    SELECT commandbus.apply_batch_delta_v1($1::text, $9::uuid,
               (u.new_status = 'COMPLETED')::int - (u.old_status = 'COMPLETED')::int,
               (u.new_status = 'FAILED')::int - (u.old_status = 'FAILED')::int,
               (u.new_status = 'CANCELED')::int - (u.old_status = 'CANCELED')::int,
               (u.new_status = 'IN_TROUBLESHOOTING_QUEUE')::int
                   - (u.old_status = 'IN_TROUBLESHOOTING_QUEUE')::int)
    FROM upd u
    WHERE $9::uuid IS NOT NULL), false) AS batch_complete
