SELECT DISTINCT domain
FROM commandbus.command
WHERE status = 'IN_TROUBLESHOOTING_QUEUE'
ORDER BY domain
