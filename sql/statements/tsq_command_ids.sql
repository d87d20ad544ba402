SELECT command_id
FROM commandbus.command
WHERE in_tsq AND status = 'IN_TROUBLESHOOTING_QUEUE'
  AND ($1::text IS NULL OR domain = $1::text)
ORDER BY created_at DESC, command_id
