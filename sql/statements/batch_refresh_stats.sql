SELECT commandbus.refresh_batch_stats_v1($1::text, $2::uuid) AS completed
