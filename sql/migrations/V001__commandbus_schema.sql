-- V001: the commandbus schema (tables and indexes).
-- Compatible with reliable-cmd 0.2.2: the same tables and column names, so a database created by
-- the predecessor upgrades in place (every statement is IF NOT EXISTS / ADD COLUMN IF NOT EXISTS).
-- PGMQ must be installed first (setup_database() does it: extension, or PGMQ's SQL-only install).

CREATE SCHEMA IF NOT EXISTS commandbus;

CREATE TABLE IF NOT EXISTS commandbus.schema_migrations (
    version     INT PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS commandbus.batch (
    domain                    TEXT NOT NULL,
    batch_id                  UUID NOT NULL,
    name                      TEXT NULL,
    custom_data               JSONB NULL,
    status                    TEXT NOT NULL DEFAULT 'PENDING',
    total_count               INT NOT NULL DEFAULT 0,
    completed_count           INT NOT NULL DEFAULT 0,
    canceled_count            INT NOT NULL DEFAULT 0,
    in_troubleshooting_count  INT NOT NULL DEFAULT 0,
    created_at                TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    started_at                TIMESTAMPTZ NULL,
    completed_at              TIMESTAMPTZ NULL,
    PRIMARY KEY (domain, batch_id)
);
ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS failed_count INT NOT NULL DEFAULT 0;
ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS batch_type TEXT NOT NULL DEFAULT 'COMMAND';
ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ NULL;
CREATE INDEX IF NOT EXISTS ix_batch_status ON commandbus.batch(domain, status);
CREATE INDEX IF NOT EXISTS ix_batch_created ON commandbus.batch(domain, created_at DESC);

CREATE TABLE IF NOT EXISTS commandbus.command (
    domain            TEXT NOT NULL,
    queue_name        TEXT NOT NULL,
    msg_id            BIGINT NULL,
    command_id        UUID NOT NULL,
    command_type      TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          INT NOT NULL DEFAULT 0,
    max_attempts      INT NULL,
    lease_expires_at  TIMESTAMPTZ NULL,
    last_error_type   TEXT NULL,
    last_error_code   TEXT NULL,
    last_error_msg    TEXT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    reply_queue       TEXT NOT NULL DEFAULT '',
    correlation_id    UUID NULL,
    batch_id          UUID NULL
);
-- NULL max_attempts means "the worker's RetryPolicy decides" (the predecessor stored the bus default).
ALTER TABLE commandbus.command ALTER COLUMN max_attempts DROP NOT NULL;
-- The handler's return value (the predecessor only put it in the reply).
ALTER TABLE commandbus.command ADD COLUMN IF NOT EXISTS result JSONB NULL;
CREATE UNIQUE INDEX IF NOT EXISTS uq_command_domain_cmdid ON commandbus.command(domain, command_id);
CREATE INDEX IF NOT EXISTS ix_command_status_type ON commandbus.command(status, command_type);
CREATE INDEX IF NOT EXISTS ix_command_status_created ON commandbus.command(status, created_at DESC);
CREATE INDEX IF NOT EXISTS ix_command_updated ON commandbus.command(updated_at);
CREATE INDEX IF NOT EXISTS ix_command_batch ON commandbus.command(domain, batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS commandbus.audit (
    audit_id      BIGSERIAL PRIMARY KEY,
    domain        TEXT NOT NULL,
    command_id    UUID NOT NULL,
    event_type    TEXT NOT NULL,
    ts            TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    details_json  JSONB NULL
);
CREATE INDEX IF NOT EXISTS ix_audit_cmdid_ts ON commandbus.audit(command_id, ts);

CREATE TABLE IF NOT EXISTS commandbus.payload_archive (
    domain        TEXT NOT NULL,
    command_id    UUID NOT NULL,
    payload_json  JSONB NOT NULL,
    archived_at   TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (domain, command_id)
);

CREATE TABLE IF NOT EXISTS commandbus.process (
    domain         TEXT NOT NULL,
    process_id     UUID NOT NULL,
    process_type   TEXT NOT NULL,
    status         TEXT NOT NULL DEFAULT 'PENDING',
    current_step   TEXT NULL,
    state          JSONB NOT NULL DEFAULT '{}'::jsonb,
    error_code     TEXT NULL,
    error_message  TEXT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    completed_at   TIMESTAMPTZ NULL,
    batch_id       UUID NULL,
    PRIMARY KEY (domain, process_id)
);
CREATE INDEX IF NOT EXISTS ix_process_status ON commandbus.process(domain, status);
CREATE INDEX IF NOT EXISTS ix_process_batch ON commandbus.process(domain, batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS commandbus.process_audit (
    id             BIGSERIAL PRIMARY KEY,
    domain         TEXT NOT NULL,
    process_id     UUID NOT NULL,
    step_name      TEXT NOT NULL,
    command_id     UUID NOT NULL,
    command_type   TEXT NOT NULL,
    command_data   JSONB NULL,
    sent_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    reply_outcome  TEXT NULL,
    reply_data     JSONB NULL,
    received_at    TIMESTAMPTZ NULL
);
CREATE INDEX IF NOT EXISTS ix_process_audit_process ON commandbus.process_audit(domain, process_id, sent_at);
CREATE INDEX IF NOT EXISTS ix_process_audit_command ON commandbus.process_audit(command_id);

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (1, 'commandbus_schema') ON CONFLICT (version) DO NOTHING;
