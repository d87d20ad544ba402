SELECT pg_notify($1::text, '')
