"""commandbus._db: the one way the psycopg path runs a named statement."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import psycopg
import pytest
from itest_helpers import fetch
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, _db
from commandbus.exceptions import (
    CommandNotFoundError,
    DatabaseError,
    DuplicateCommandError,
    SchemaNotInstalledError,
)


async def test_row_shapes_on_a_pool_and_on_a_connection(pool: AsyncConnectionPool[Any]) -> None:
    assert await _db.fetch_all(pool, "schema_exists") == [(True,)]
    assert await _db.fetch_all(pool, "schema_exists", rows=dict) == [{"present": True}]
    assert await _db.fetch_one(pool, "schema_exists") == (True,)
    assert await _db.fetch_one(pool, "schema_exists", rows=dict) == {"present": True}
    assert await _db.fetch_value(pool, "schema_exists") is True
    async with pool.connection() as conn:
        assert await _db.fetch_value(conn, "schema_exists") is True
        assert await _db.fetch_all(conn, "tsq_domains") == []
        # No row: None; a statement without a result: no rows, rowcount of what it changed.
        assert await _db.fetch_one(conn, "get_command", "orders", uuid4()) is None
        assert await _db.fetch_one(conn, "get_command", "orders", uuid4(), rows=dict) is None
        assert await _db.fetch_value(conn, "get_command", "orders", uuid4()) is None
        assert await _db.fetch_all(conn, "batch_listen") == []
        assert await _db.fetch_one(conn, "batch_listen") is None


async def test_execute_returns_the_rowcount(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    try:
        cid = uuid4()
        await bus.send("orders", "A", cid, {})
    finally:
        await bus.close()
    args = ("orders", cid, "CANCELED")
    assert await _db.execute(pool, "repo_command_update_status", *args) == 1
    assert await _db.execute(pool, "repo_command_update_status", "orders", uuid4(), "X") == 0
    assert await fetch(pool, "SELECT status FROM commandbus.command") == [("CANCELED",)]


async def test_a_connection_joins_the_callers_transaction(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    try:
        cid = uuid4()
        with pytest.raises(RuntimeError, match="roll back"):
            async with pool.connection() as conn, conn.transaction():
                await bus.send("orders", "A", cid, {}, conn=conn)
                assert await _db.fetch_value(conn, "command_exists", "orders", cid) is True
                raise RuntimeError("roll back")
        assert await _db.fetch_value(pool, "command_exists", "orders", cid) is False
    finally:
        await bus.close()


async def test_errors_are_ours_with_the_driver_error_as_cause(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    try:
        cid = uuid4()
        await bus.send("orders", "A", cid, {})
        async with pool.connection() as conn:
            with pytest.raises(DuplicateCommandError) as dup:
                await bus.send("orders", "A", cid, {}, conn=conn)
        assert (dup.value.domain, dup.value.command_id) == ("orders", str(cid))
        assert isinstance(dup.value.__cause__, psycopg.Error)
        assert dup.value.__cause__.sqlstate == "CB001"
    finally:
        await bus.close()
    with pytest.raises(CommandNotFoundError) as missing:
        await _db.execute(pool, "tsq_cancel", "orders", uuid4(), "why", None, domain="orders")
    assert missing.value.domain == "orders"
    assert isinstance(missing.value.__cause__, psycopg.Error)
    # A missing queue table is named when the statement says which queue it works on.
    with pytest.raises(DatabaseError, match="PGMQ queue 'nope' does not exist") as queue:
        await _db.fetch_all(pool, "pgmq_read", "nope", 30, 1, queue="nope")
    assert isinstance(queue.value.__cause__, psycopg.errors.UndefinedTable)


async def test_a_missing_schema_is_reported_as_such(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:
        await conn.execute("DROP SCHEMA commandbus CASCADE")
    with pytest.raises(SchemaNotInstalledError) as info:
        await _db.fetch_one(pool, "get_command", "orders", uuid4())
    assert isinstance(info.value.__cause__, psycopg.Error)
