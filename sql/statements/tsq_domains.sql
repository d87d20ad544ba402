SELECT DISTINCT domain
FROM commandbus.command
WHERE in_tsq AND status = 'IN_TROUBLESHOOTING_QUEUE'
ORDER BY domain
