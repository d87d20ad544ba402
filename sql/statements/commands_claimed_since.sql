-- The commands of domain $1 claimed by a worker (or sorted out into the troubleshooting queue
-- when claimed: poison, malformed) after audit row $2, in the order they were sent.
SELECT c.command_id
FROM commandbus.command c
WHERE c.domain = $1::text
  AND c.command_id IN (
      SELECT a.command_id FROM commandbus.audit a
      WHERE a.audit_id > $2::bigint AND a.domain = $1::text
        AND a.event_type IN ('RECEIVED', 'MOVED_TO_TSQ'))
ORDER BY c.created_at, c.msg_id NULLS LAST, c.command_id
