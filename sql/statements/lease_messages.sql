SELECT commandbus.lease_messages_v1($1::text, $2::int, $3::int, true) AS msg_ids
