INSERT INTO commandbus.schema_migrations (version, name) VALUES ($1::int, $2::text) ON CONFLICT (version) DO NOTHING
