-- Installs the pgmq extension where the server offers it; otherwise PGMQ's SQL-only install
-- (setup_database() does it, from the pgmq package) must have run before this script.
DO $$
BEGIN
    IF to_regclass('pgmq.meta') IS NULL
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq') THEN
        CREATE EXTENSION IF NOT EXISTS pgmq;
    END IF;
END $$
