"""Schema setup: fresh install, concurrency, the migration-tool SQL, upgrade of a predecessor
database, and the typed error when the schema is missing."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    SchemaNotInstalledError,
    Worker,
    check_schema_exists,
    get_schema_sql,
    setup_database,
)
from commandbus.embedded import install_pgmq
from commandbus.exceptions import PostgresError

# The tables of reliable-cmd 0.2.2 as its packaged migrations left them (what a team switching
# packages has): no batch.batch_type, max_attempts NOT NULL, no command.result, no process tables.
PREDECESSOR_SCHEMA = """
CREATE SCHEMA commandbus;
CREATE TABLE commandbus.batch (
    domain TEXT NOT NULL, batch_id UUID NOT NULL, name TEXT NULL, custom_data JSONB NULL,
    status TEXT NOT NULL DEFAULT 'PENDING', total_count INT NOT NULL DEFAULT 0,
    completed_count INT NOT NULL DEFAULT 0, canceled_count INT NOT NULL DEFAULT 0,
    in_troubleshooting_count INT NOT NULL DEFAULT 0, created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    started_at TIMESTAMPTZ NULL, completed_at TIMESTAMPTZ NULL, failed_count INT NOT NULL DEFAULT 0,
    PRIMARY KEY (domain, batch_id));
CREATE TABLE commandbus.command (
    domain TEXT NOT NULL, queue_name TEXT NOT NULL, msg_id BIGINT NULL, command_id UUID NOT NULL,
    command_type TEXT NOT NULL, status TEXT NOT NULL, attempts INT NOT NULL DEFAULT 0,
    max_attempts INT NOT NULL, lease_expires_at TIMESTAMPTZ NULL, last_error_type TEXT NULL,
    last_error_code TEXT NULL, last_error_msg TEXT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), reply_queue TEXT NOT NULL DEFAULT '',
    correlation_id UUID NULL, batch_id UUID NULL);
CREATE UNIQUE INDEX uq_command_domain_cmdid ON commandbus.command(domain, command_id);
CREATE TABLE commandbus.audit (
    audit_id BIGSERIAL PRIMARY KEY, domain TEXT NOT NULL, command_id UUID NOT NULL,
    event_type TEXT NOT NULL, ts TIMESTAMPTZ NOT NULL DEFAULT NOW(), details_json JSONB NULL);
CREATE TABLE commandbus.payload_archive (
    domain TEXT NOT NULL, command_id UUID NOT NULL, payload_json JSONB NOT NULL,
    archived_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), PRIMARY KEY (domain, command_id));
INSERT INTO commandbus.command (domain, queue_name, command_id, command_type, status, max_attempts)
VALUES ('orders', 'orders__commands', '00000000-0000-0000-0000-000000000001', 'Old',
        'COMPLETED', 3);
"""


# The schema reliable-cmd 0.2.2's repository migrations make (not its package): batch.batch_type,
# an index on command(batch_id, status), process tables with VARCHAR columns and their own
# indexes, and plpgsql functions sp_* (stubs here: their presence is the point, and a stub that
# raises shows that nothing of ours calls them). A completed command, a pending one in a batch
# whose queue message waits, a process with one audit row.
OLD_DONE = UUID("00000000-0000-0000-0000-000000000001")
OLD_PENDING = UUID("00000000-0000-0000-0000-000000000002")
OLD_BATCH = UUID("00000000-0000-0000-0000-0000000000b1")
OLD_PROCESS = UUID("00000000-0000-0000-0000-0000000000c1")
PREDECESSOR_REPO_SCHEMA = (
    """
CREATE SCHEMA commandbus;
CREATE TABLE commandbus.batch (
    domain TEXT NOT NULL, batch_id UUID NOT NULL, name TEXT NULL, custom_data JSONB NULL,
    status TEXT NOT NULL DEFAULT 'PENDING', total_count INT NOT NULL DEFAULT 0,
    completed_count INT NOT NULL DEFAULT 0, canceled_count INT NOT NULL DEFAULT 0,
    in_troubleshooting_count INT NOT NULL DEFAULT 0, created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    started_at TIMESTAMPTZ NULL, completed_at TIMESTAMPTZ NULL,
    batch_type TEXT NOT NULL DEFAULT 'COMMAND', failed_count INT NOT NULL DEFAULT 0,
    PRIMARY KEY (domain, batch_id));
CREATE TABLE commandbus.command (
    domain TEXT NOT NULL, queue_name TEXT NOT NULL, msg_id BIGINT NULL, command_id UUID NOT NULL,
    command_type TEXT NOT NULL, status TEXT NOT NULL, attempts INT NOT NULL DEFAULT 0,
    max_attempts INT NOT NULL, lease_expires_at TIMESTAMPTZ NULL, last_error_type TEXT NULL,
    last_error_code TEXT NULL, last_error_msg TEXT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), reply_queue TEXT NOT NULL DEFAULT '',
    correlation_id UUID NULL, batch_id UUID NULL);
CREATE UNIQUE INDEX uq_command_domain_cmdid ON commandbus.command(domain, command_id);
CREATE INDEX ix_command_batch_status ON commandbus.command(batch_id, status)
    WHERE batch_id IS NOT NULL;
CREATE TABLE commandbus.audit (
    audit_id BIGSERIAL PRIMARY KEY, domain TEXT NOT NULL, command_id UUID NOT NULL,
    event_type TEXT NOT NULL, ts TIMESTAMPTZ NOT NULL DEFAULT NOW(), details_json JSONB NULL);
CREATE TABLE commandbus.payload_archive (
    domain TEXT NOT NULL, command_id UUID NOT NULL, payload_json JSONB NOT NULL,
    archived_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), PRIMARY KEY (domain, command_id));
CREATE TABLE commandbus.process (
    domain VARCHAR(255) NOT NULL, process_id UUID NOT NULL, process_type VARCHAR(255) NOT NULL,
    status VARCHAR(50) NOT NULL DEFAULT 'PENDING', current_step VARCHAR(255),
    state JSONB NOT NULL DEFAULT '{}', error_code VARCHAR(255), error_message TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    completed_at TIMESTAMPTZ, batch_id UUID, PRIMARY KEY (domain, process_id));
CREATE INDEX idx_process_type ON commandbus.process(domain, process_type);
CREATE INDEX idx_process_status ON commandbus.process(domain, status);
CREATE INDEX idx_process_created ON commandbus.process(created_at);
CREATE INDEX ix_process_batch_id ON commandbus.process(domain, batch_id);
CREATE INDEX ix_process_batch_status ON commandbus.process(batch_id, status);
CREATE TABLE commandbus.process_audit (
    id BIGSERIAL PRIMARY KEY, domain VARCHAR(255) NOT NULL, process_id UUID NOT NULL,
    step_name VARCHAR(255) NOT NULL, command_id UUID NOT NULL, command_type VARCHAR(255) NOT NULL,
    command_data JSONB, sent_at TIMESTAMPTZ NOT NULL, reply_outcome VARCHAR(50),
    reply_data JSONB, received_at TIMESTAMPTZ,
    FOREIGN KEY (domain, process_id) REFERENCES commandbus.process(domain, process_id));
CREATE INDEX idx_process_audit_process ON commandbus.process_audit(domain, process_id);
CREATE INDEX idx_process_audit_command ON commandbus.process_audit(command_id);
"""
    + "".join(
        f"CREATE FUNCTION commandbus.{name}(p_domain TEXT, p_id UUID) RETURNS VOID\n"
        "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'predecessor function called'; END $$;\n"
        for name in (
            "sp_receive_command",
            "sp_finish_command",
            "sp_fail_command",
            "sp_update_batch_counters",
            "sp_start_batch",
            "sp_refresh_batch_stats",
            "sp_tsq_complete",
            "sp_tsq_cancel",
            "sp_tsq_retry",
        )
    )
    + f"""
SELECT pgmq.create('orders__commands');
INSERT INTO commandbus.batch (domain, batch_id, name, status, total_count)
VALUES ('orders', '{OLD_BATCH}', 'old batch', 'PENDING', 1);
INSERT INTO commandbus.command
    (domain, queue_name, msg_id, command_id, command_type, status, max_attempts, batch_id)
VALUES ('orders', 'orders__commands', NULL, '{OLD_DONE}', 'Old', 'COMPLETED', 3, NULL),
       ('orders', 'orders__commands',
        (SELECT * FROM pgmq.send('orders__commands', jsonb_build_object(
            'domain', 'orders', 'command_type', 'Old', 'command_id', '{OLD_PENDING}',
            'correlation_id', '{OLD_PENDING}', 'data', jsonb_build_object('n', 1)))),
        '{OLD_PENDING}', 'Old', 'PENDING', 3, '{OLD_BATCH}');
INSERT INTO commandbus.process (domain, process_id, process_type, status, current_step, batch_id)
VALUES ('orders', '{OLD_PROCESS}', 'Fulfil', 'WAITING_FOR_REPLY', 'ship', '{OLD_BATCH}');
INSERT INTO commandbus.process_audit
    (domain, process_id, step_name, command_id, command_type, command_data, sent_at)
VALUES ('orders', '{OLD_PROCESS}', 'ship', '{OLD_PENDING}', 'Old', '{{"n": 1}}', now());
"""
)


async def _pool(dsn: str) -> AsyncConnectionPool[Any]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=5, open=False)
    await pool.open()
    return pool


async def test_concurrent_setup_creates_once(empty_db: str) -> None:
    pool = await _pool(empty_db)
    try:
        assert not await check_schema_exists(pool)
        results = await asyncio.gather(*(setup_database(pool) for _ in range(3)))
        assert sorted(results) == [False, False, True]
        assert await check_schema_exists(pool)
        async with await psycopg.AsyncConnection.connect(empty_db) as conn:
            assert await setup_database(conn) is False  # a plain connection works too
        rows = await _execute(pool, "SELECT version FROM commandbus.schema_migrations ORDER BY 1")
        assert rows == [
            (v,) for v, _, _ in __import__("commandbus._sql", fromlist=["x"]).migrations()
        ]
    finally:
        await pool.close()


async def _execute(pool: AsyncConnectionPool[Any], sql: str) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        return await (await conn.execute(sql)).fetchall()  # type: ignore[arg-type]


async def test_schema_sql_for_migration_tools(empty_db: str) -> None:
    install_pgmq(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(get_schema_sql())  # type: ignore[arg-type]
        conn.execute(get_schema_sql())  # type: ignore[arg-type]  # re-runnable
    pool = await _pool(empty_db)
    try:
        assert await setup_database(pool) is False  # recorded as applied
        await CommandBus(pool).send("orders", "T", uuid4(), {})
    finally:
        await pool.close()


async def test_upgrades_a_predecessor_database_in_place(empty_db: str) -> None:
    install_pgmq(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(PREDECESSOR_SCHEMA)  # type: ignore[arg-type]
    pool = await _pool(empty_db)
    try:
        assert await setup_database(pool) is False
        cols = await _execute(
            pool,
            "SELECT table_name || '.' || column_name FROM information_schema.columns "
            "WHERE table_schema = 'commandbus' AND column_name IN ('batch_type', 'result')"
            " AND table_name IN ('batch', 'command')",
        )
        assert sorted(c[0] for c in cols) == ["batch.batch_type", "command.result"]
        bus = CommandBus(pool)
        old = await bus.get_command("orders", UUID("00000000-0000-0000-0000-000000000001"))
        assert old is not None and old.status.value == "COMPLETED"
        await bus.send("orders", "New", uuid4(), {})
    finally:
        await pool.close()


async def test_upgrades_a_predecessor_repository_database_in_place(empty_db: str) -> None:
    """The predecessor's repository migrations (process tables, sp_* functions, other index
    names): setup keeps their objects and rows, adds ours, and the bus and a worker run on it,
    the predecessor's pending command included."""
    install_pgmq(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(PREDECESSOR_REPO_SCHEMA)  # type: ignore[arg-type]
    pool = await _pool(empty_db)
    try:
        assert await setup_database(pool) is False
        cols = await _execute(
            pool,
            "SELECT table_name || '.' || column_name FROM information_schema.columns "
            "WHERE table_schema = 'commandbus' AND table_name IN ('batch', 'command') "
            "AND column_name IN ('updated_at', 'result', 'in_tsq')",
        )
        assert sorted(c[0] for c in cols) == [
            "batch.updated_at", "command.in_tsq", "command.result", "command.updated_at",
        ]  # fmt: skip
        indexes = {r[0] for r in await _execute(
            pool, "SELECT indexname FROM pg_indexes WHERE schemaname = 'commandbus'"
        )}  # fmt: skip
        # No index on a column the hot path writes (the predecessor's (batch_id, status) one).
        assert "ix_command_batch_status" not in indexes
        assert {"ix_command_tsq", "ix_command_created", "ix_process_status"} <= indexes
        assert {
            "idx_process_type",
            "ix_process_batch_status",
            "idx_process_audit_command",
        } <= indexes
        functions = await _execute(
            pool,
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'commandbus' AND p.proname LIKE 'sp\\_%'",
        )
        assert functions == [(9,)]

        bus = CommandBus(pool)
        done = await bus.get_command("orders", OLD_DONE)
        assert done is not None and done.status.value == "COMPLETED" and done.max_attempts == 3
        pending = await bus.get_command("orders", OLD_PENDING)
        assert pending is not None and pending.status.value == "PENDING"
        assert pending.batch_id == OLD_BATCH
        batch = await bus.get_batch("orders", OLD_BATCH)
        assert batch is not None and batch.batch_type == "COMMAND" and batch.total_count == 1

        new = uuid4()
        await bus.send("orders", "New", new, {"n": 2})
        seen: list[tuple[str, Any]] = []
        registry = HandlerRegistry()

        @registry.handler("orders", "Old")
        @registry.handler("orders", "New")
        async def handle(command: Command, context: HandlerContext) -> dict[str, Any]:
            seen.append((command.command_type, command.data))
            return {"ok": True}

        worker = Worker(pool, "orders", registry)
        task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
        try:

            async def both_completed() -> bool:
                rows = await _execute(
                    pool,
                    "SELECT count(*) FROM commandbus.command "
                    f"WHERE command_id IN ('{OLD_PENDING}', '{new}') AND status = 'COMPLETED'",
                )
                return rows == [(2,)]

            deadline = asyncio.get_running_loop().time() + 20
            while not await both_completed():
                assert asyncio.get_running_loop().time() < deadline, "not worked within 20 s"
                await asyncio.sleep(0.05)
        finally:
            await worker.stop(timeout=5)
            await task
        assert sorted(seen) == [("New", {"n": 2}), ("Old", {"n": 1})]
        batch = await bus.get_batch("orders", OLD_BATCH)
        assert batch is not None and batch.status.value == "COMPLETED"
        assert batch.completed_count == 1

        # The predecessor's processes are left as they were.
        assert await _execute(
            pool, "SELECT process_type, status, current_step, batch_id FROM commandbus.process"
        ) == [("Fulfil", "WAITING_FOR_REPLY", "ship", OLD_BATCH)]
        assert await _execute(
            pool, "SELECT step_name, command_id, command_data FROM commandbus.process_audit"
        ) == [("ship", OLD_PENDING, {"n": 1})]
        types = await _execute(
            pool,
            "SELECT data_type FROM information_schema.columns WHERE table_schema = 'commandbus'"
            " AND table_name = 'process' AND column_name = 'process_type'",
        )
        assert types == [("character varying",)]
    finally:
        await pool.close()


async def test_missing_schema_is_a_typed_error(empty_db: str) -> None:
    pool = await _pool(empty_db)
    try:
        bus = CommandBus(pool)
        with pytest.raises(SchemaNotInstalledError) as info:
            await bus.send("orders", "T", uuid4(), {})
        assert isinstance(info.value.__cause__, PostgresError)
        assert "setup_database" in str(info.value)
        with pytest.raises(SchemaNotInstalledError) as info2:
            async with pool.connection() as conn:
                await bus.send("orders", "T", uuid4(), {}, conn=conn)
        assert isinstance(info2.value.__cause__, psycopg.Error)
        with pytest.raises(SchemaNotInstalledError):
            await bus.get_command("orders", uuid4())
    finally:
        await pool.close()


QUEUE_TUNING = {
    "autovacuum_vacuum_threshold": "10000",
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_cost_delay": "0",
    "autovacuum_analyze_threshold": "10000",
    "autovacuum_analyze_scale_factor": "0",
    "vacuum_index_cleanup": "on",
}


async def _reloptions(pool: AsyncConnectionPool[Any], table: str) -> dict[str, str]:
    rows = await _execute(
        pool, f"SELECT unnest(reloptions) FROM pg_class WHERE oid = 'pgmq.{table}'::regclass"
    )
    return dict(r[0].split("=", 1) for r in rows)


async def test_queue_tables_get_their_own_vacuum_settings(empty_db: str) -> None:
    """V005: a queue that existed before the migration and one created after it (by a send)
    both carry the storage parameters that make autovacuum visit them early and clean their
    indexes; a queue another role owns, and a partitioned one, are left alone."""
    install_pgmq(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("SELECT pgmq.create('legacy__commands')")
        conn.execute("SELECT pgmq.create('theirs')")
        conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rcmd_other')"
            " THEN CREATE ROLE rcmd_other; END IF; END $$"
        )
        conn.execute("ALTER TABLE pgmq.q_theirs OWNER TO rcmd_other")
        # A partitioned queue as pgmq.create_partitioned leaves it (that needs pg_partman,
        # which this server lacks): its table takes no storage parameters, and the migration
        # must not fail on it.
        conn.execute(
            "CREATE TABLE pgmq.q_parted (msg_id BIGINT, vt TIMESTAMPTZ) PARTITION BY RANGE (msg_id)"
        )
        conn.execute(
            "INSERT INTO pgmq.meta (queue_name, is_partitioned, is_unlogged)"
            " VALUES ('parted', true, false)"
        )
    pool = await _pool(empty_db)
    try:
        # The migrating role here is a superuser, who may alter any table: the owner check
        # is what leaves the other role's queue alone.
        assert await setup_database(pool) is True
        assert await _reloptions(pool, "q_legacy__commands") == QUEUE_TUNING
        await CommandBus(pool).send("fresh", "T", uuid4(), {})
        assert await _reloptions(pool, "q_fresh__commands") == QUEUE_TUNING
        assert await _reloptions(pool, "q_theirs") == {}
        assert await _reloptions(pool, "q_parted") == {}
    finally:
        await pool.close()
