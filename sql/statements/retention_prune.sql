SELECT commands, audit_events, payloads, messages, batches FROM commandbus.prune_v1($1::timestamptz, $2::text, $3::int)
