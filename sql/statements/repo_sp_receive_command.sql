WITH upd AS (
    UPDATE commandbus.command c
    SET attempts = c.attempts + 1, status = $3::text, updated_at = now()
    WHERE c.domain = $1::text AND c.command_id = $2::uuid AND c.status NOT IN ('COMPLETED', 'CANCELED')
    RETURNING c.*
), aud AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT u.domain, u.command_id, 'RECEIVED', jsonb_build_object(
               'msg_id', coalesce($4::bigint, u.msg_id), 'attempt', u.attempts,
               'max_attempts', coalesce($5::int, u.max_attempts))
    FROM upd u
), bst AS (
    UPDATE commandbus.batch b
    SET status = 'IN_PROGRESS', started_at = coalesce(b.started_at, now())
    FROM upd u
    WHERE b.domain = u.domain AND b.batch_id = u.batch_id AND b.status = 'PENDING'
    RETURNING b.domain, b.batch_id
), bsa AS (
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    SELECT s.domain, s.batch_id, 'BATCH_STARTED', jsonb_build_object('batch_id', s.batch_id)
    FROM bst s
)
SELECT u.domain, u.command_id, u.command_type, u.status, u.attempts,
       coalesce($5::int, u.max_attempts) AS max_attempts, coalesce($4::bigint, u.msg_id) AS msg_id,
       u.correlation_id, nullif(u.reply_queue, '') AS reply_to, u.last_error_type,
       u.last_error_code, u.last_error_msg, u.created_at, u.updated_at, u.batch_id, u.result
FROM upd u
