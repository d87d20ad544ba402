-- Messages in a queue ($1: its name): all of them, and those visible now (no lease, no backoff
-- pending). queue_visible_length came with PGMQ 1.5; with an older PGMQ `visible` is NULL.
SELECT m.queue_length AS total, (to_jsonb(m) ->> 'queue_visible_length')::bigint AS visible
FROM pgmq.metrics($1::text) AS m
