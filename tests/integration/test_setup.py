"""Schema setup: fresh install, concurrency, the migration-tool SQL, upgrade of a predecessor
database, and the typed error when the schema is missing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
import pytest_asyncio
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    CommandBus,
    SchemaNotInstalledError,
    check_schema_exists,
    get_schema_sql,
    setup_database,
)
from commandbus.embedded import create_database, drop_database, install_pgmq
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


@pytest_asyncio.fixture
async def empty_db(pg_admin_dsn: str) -> AsyncIterator[str]:
    name = f"rcmd_setup_{uuid4().hex[:8]}"
    dsn = create_database(pg_admin_dsn, name)
    try:
        yield dsn
    finally:
        drop_database(pg_admin_dsn, name)


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
            "WHERE table_schema = 'commandbus' AND column_name IN ('batch_type', 'result')",
        )
        assert sorted(c[0] for c in cols) == ["batch.batch_type", "command.result"]
        bus = CommandBus(pool)
        old = await bus.get_command("orders", UUID("00000000-0000-0000-0000-000000000001"))
        assert old is not None and old.status.value == "COMPLETED"
        await bus.send("orders", "New", uuid4(), {})
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
