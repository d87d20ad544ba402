"""The worker's NOTIFY listener on a connection that goes silent (issue 15): the engine checks
the listener's connection every 5 s within its call deadline, drops it when it does not answer
and listens on a fresh one. The dropped listener's `UNLISTEN *` never gets an answer there; the
vendored sqlx-postgres patch (rust/vendor/sqlx-postgres/RCMD-PATCH.md) gives it 5 s and then
closes the connection. Before, each replaced listener left a socket (and a task) waiting
forever: neither keepalives nor TCP_USER_TIMEOUT end a connection whose proxy's kernel still
answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from proxy import FaultProxy
from psycopg_pool import AsyncConnectionPool

from commandbus import Command, CommandBus, HandlerContext, HandlerRegistry, Worker

pytestmark = [pytest.mark.timeout(90)]

DOMAIN = "silentlisten"


def _established_local_ports(remote_port: int) -> set[int]:
    """Local ports of this machine's ESTABLISHED IPv4 TCP sockets to `remote_port`."""
    ports = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.split(":")[1], 16) == remote_port:
                ports.add(int(local.split(":")[1], 16))
    return ports


async def _listener_client_port(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """The port the server sees for the worker's LISTEN connection (the proxy's side)."""
    cur = await conn.execute(
        "SELECT client_port FROM pg_stat_activity"
        " WHERE application_name LIKE 'rcmd worker%%' AND (query LIKE 'LISTEN%%'"
        " OR query = 'SELECT 1')"
    )
    row = await cur.fetchone()
    return None if row is None else int(row[0])


def _proxy_client_port(proxy: FaultProxy, server_side_port: int) -> int:
    """Our end's local port of the proxied connection whose server side uses this port."""

    async def find() -> int:
        for c in proxy._conns:
            if c.to_server.writer.get_extra_info("sockname")[1] == server_side_port:
                return int(c.to_client.writer.get_extra_info("peername")[1])
        raise AssertionError(f"no proxied connection from port {server_side_port}")

    return int(proxy._call(find()))


async def test_replaced_listener_leaves_no_connection_behind(
    pool: AsyncConnectionPool[Any],
    database_url: str,
    proxied: tuple[FaultProxy, str],
    proxied_pool: Callable[..., Awaitable[AsyncConnectionPool[Any]]],
) -> None:
    proxy, _ = proxied
    behind = await proxied_pool(max_size=2)
    registry = HandlerRegistry()
    done: list[uuid.UUID] = []

    @registry.handler(DOMAIN, "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> None:
        done.append(cmd.command_id)

    worker = Worker(behind, DOMAIN, registry, call_timeout=1.0)
    task = asyncio.create_task(worker.run(concurrency=2, poll_interval=0.5))
    try:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            t0 = time.monotonic()
            server_port = None
            while server_port is None and time.monotonic() - t0 < 20:
                server_port = await _listener_client_port(c)
                await asyncio.sleep(0.1)
            assert server_port is not None, "the worker never listened"
        ours = _proxy_client_port(proxy, server_port)
        assert ours in _established_local_ports(proxy.port)
        proxy.freeze()
        # Listener check (5 s) + call deadline (1 s) + the UNLISTEN's 5 s, with room.
        t0 = time.monotonic()
        while ours in _established_local_ports(proxy.port) and time.monotonic() - t0 < 30:  # noqa: ASYNC110
            await asyncio.sleep(0.25)
        assert ours not in _established_local_ports(proxy.port), (
            "the replaced listener's connection is still open"
        )
        # And the new listener hears: a command sent now is handled at once.
        bus = CommandBus(pool)
        command_id = uuid.uuid4()
        await bus.send(DOMAIN, "Ok", command_id, {})
        t0 = time.monotonic()
        while command_id not in done and time.monotonic() - t0 < 20:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert command_id in done
        await bus.close()
    finally:
        await worker.stop(timeout=5)
        await task
