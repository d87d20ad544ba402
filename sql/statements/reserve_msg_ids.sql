-- $1 msg_ids of a queue, in order, from its own sequence, and the server's clock_timestamp() as
-- microseconds since the epoch: what `send_commands_direct` takes as $7 and $8 for a unit of
-- `send_ordered` ({queue_table} as there). A reservation never used leaves a gap in the ids.
SELECT array_agg(nextval((SELECT pg_get_serial_sequence('pgmq.{queue_table}', 'msg_id'))::regclass) ORDER BY g) AS msg_ids,
       (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS vt_us
FROM generate_series(1, $1::int) AS g
