"""The engine's connections name themselves in `pg_stat_activity` (the console's "workers
seen", contracts.md): `rcmd worker <domain> <hostname>:<pid>` for a worker, `rcmd bus` for a
bus."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import Any

from psycopg_pool import AsyncConnectionPool

from commandbus import Command, CommandBus, HandlerContext, HandlerRegistry, Worker


async def names(pool: AsyncConnectionPool[Any]) -> set[str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'rcmd %%'"
        )
        return {r[0] for r in await cur.fetchall()}


async def test_worker_and_bus_connections_are_named(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()

    @registry.handler("named", "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> None:
        return None

    bus = CommandBus(pool)
    worker = Worker(pool, "named", registry)
    task = asyncio.create_task(worker.run(concurrency=2, poll_interval=0.05))
    try:
        await bus.send("named", "Ok", uuid.uuid4(), {})
        expected = {f"rcmd worker named {socket.gethostname()}:{os.getpid()}", "rcmd bus"}
        for _ in range(100):
            if expected <= await names(pool):
                break
            await asyncio.sleep(0.05)
        assert expected <= await names(pool)
    finally:
        await worker.stop(timeout=5)
        await task
        await bus.close()
