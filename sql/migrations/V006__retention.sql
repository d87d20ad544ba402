-- V006: retention (prune_v1 is defined in V007, which moved it onto ix_command_created).

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (6, 'retention') ON CONFLICT (version) DO NOTHING;
