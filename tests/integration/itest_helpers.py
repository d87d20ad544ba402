"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool


async def fetch(pool: AsyncConnectionPool[Any], sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, params or None)
        return await cur.fetchall()


async def status_of(pool: AsyncConnectionPool[Any], domain: str, command_id: UUID) -> str | None:
    rows = await fetch(
        pool,
        "SELECT status FROM commandbus.command WHERE domain = %s AND command_id = %s",
        domain,
        command_id,
    )
    return rows[0][0] if rows else None


async def events(pool: AsyncConnectionPool[Any], command_id: UUID) -> list[str]:
    rows = await fetch(
        pool,
        "SELECT event_type FROM commandbus.audit WHERE command_id = %s ORDER BY audit_id",
        command_id,
    )
    return [r[0] for r in rows]


async def function_calls(pool: AsyncConnectionPool[Any], name: str) -> int:
    """Calls of a commandbus function counted by pg_stat_user_functions (track_functions on;
    a backend reports its counts when it goes idle, so callers poll)."""
    rows = await fetch(
        pool,
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
        " WHERE schemaname = 'commandbus' AND funcname = %s",
        name,
    )
    return int(rows[0][0])


async def queue_depth(pool: AsyncConnectionPool[Any], queue: str) -> int:
    rows = await fetch(pool, f"SELECT count(*) FROM pgmq.q_{queue}")  # test-only name
    return int(rows[0][0])


async def read_queue(pool: AsyncConnectionPool[Any], queue: str) -> list[dict[str, Any]]:
    rows = await fetch(pool, "SELECT message FROM pgmq.read(%s, 30, 1000)", queue)
    return [r[0] for r in rows]


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 20.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
