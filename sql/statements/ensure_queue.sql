SELECT commandbus.ensure_queue_v1($1::text) AS created
