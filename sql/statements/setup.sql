-- Schema setup (python/commandbus/setup.py): PGMQ, the migrations, get_schema_sql().

-- name: schema_exists
-- Whether the commandbus schema exists.
-- No parameters.
SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = 'commandbus') AS present

-- name: schema_prelude
-- The head of get_schema_sql(): installs the pgmq extension where the server offers it;
-- otherwise PGMQ's SQL-only install (setup_database() does it, from the pgmq package) must
-- have run before the script. No trailing semicolon: get_schema_sql() adds it.
-- No parameters.
DO $$
BEGIN
    IF to_regclass('pgmq.meta') IS NULL
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq') THEN
        CREATE EXTENSION IF NOT EXISTS pgmq;
    END IF;
END $$

-- name: setup_lock
-- Serialises concurrent setup_database() calls (transaction-level advisory lock).
-- $1 lock_key BIGINT
SELECT pg_advisory_xact_lock($1::bigint)

-- name: setup_migration_record
-- Records a migration as applied (each migration also records itself).
-- $1 version INT, $2 name TEXT
INSERT INTO commandbus.schema_migrations (version, name) VALUES ($1::int, $2::text) ON CONFLICT (version) DO NOTHING

-- name: setup_migrations_applied
-- The versions of the migrations applied.
-- No parameters.
SELECT version FROM commandbus.schema_migrations WHERE to_regclass('commandbus.schema_migrations') IS NOT NULL

-- name: setup_pgmq_available
-- Whether the server offers the pgmq extension.
-- No parameters.
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq') AS available

-- name: setup_pgmq_extension
-- Installs the pgmq extension.
-- No parameters.
CREATE EXTENSION IF NOT EXISTS pgmq

-- name: setup_pgmq_installed
-- Whether PGMQ is installed (as the extension or by its SQL-only install).
-- No parameters.
SELECT to_regclass('pgmq.meta') IS NOT NULL AS installed
