SELECT count(*) AS n
FROM commandbus.command
WHERE domain = $1::text
  AND in_tsq AND status = 'IN_TROUBLESHOOTING_QUEUE'
  AND ($2::text IS NULL OR command_type = $2::text)
