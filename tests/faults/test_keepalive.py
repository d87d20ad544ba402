"""The engine's TCP connections carry keepalives (rust/vendor/sqlx-core/RCMD-PATCH.md): the
kernel runs a keepalive timer on each of them, which `ss -o` shows."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest
from psycopg_pool import AsyncConnectionPool

from commandbus import Command, HandlerContext, HandlerRegistry, Worker


def keepalive_sockets(port: int) -> set[str]:
    """Local addresses of this process's established TCP connections to `port` whose keepalive
    timer runs within the engine's 15 s idle time (libpq's own default is 2 hours)."""
    out = subprocess.run(
        ["ss", "-tnopH", "state", "established", "dport", "=", f":{port}"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    found = set()
    for line in out.splitlines():
        timer = re.search(r"timer:\(keepalive,(?:(\d+)sec|(\d+)ms)", line)
        if f"pid={os.getpid()}," in line and timer:
            found.add(line.split()[2])
    return found


async def test_engine_connections_have_keepalive_timers(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    port = urlsplit(database_url).port
    if port is None or urlsplit(database_url).hostname in (None, "") or shutil.which("ss") is None:
        pytest.skip("needs a TCP database URL and the `ss` tool (iproute2)")
    registry = HandlerRegistry()

    @registry.handler("keepalive", "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> None:
        return None

    before = keepalive_sockets(port)
    worker = Worker(pool, "keepalive", registry)
    task = asyncio.create_task(worker.run(concurrency=2, poll_interval=0.05))
    try:
        found: set[str] = set()
        for _ in range(100):
            found = keepalive_sockets(port) - before
            if len(found) >= 2:
                break
            await asyncio.sleep(0.05)
        # The claim connection and the listener's, at least: each with a keepalive timer.
        assert len(found) >= 2, found
    finally:
        await worker.stop(timeout=5)
        await task
