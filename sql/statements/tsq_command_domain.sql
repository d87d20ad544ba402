SELECT domain
FROM commandbus.command
WHERE command_id = $1::uuid
ORDER BY (status = 'IN_TROUBLESHOOTING_QUEUE') DESC, domain
LIMIT 1
