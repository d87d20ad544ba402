"""Fixtures of the fault tests: a TCP proxy in front of the test server that can stop
forwarding (proxy.FaultProxy), and pools whose connections go through it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from proxy import FaultProxy
from psycopg_pool import AsyncConnectionPool

ProxiedPool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


@pytest.fixture
async def proxied(database_url: str) -> AsyncIterator[tuple[FaultProxy, str]]:
    """A FaultProxy in front of the test server, and the DSN that goes through it."""
    try:
        proxy = FaultProxy.for_dsn(database_url)
    except ValueError as exc:
        pytest.skip(f"needs a TCP database URL: {exc}")
    with proxy:
        yield proxy, proxy.dsn(database_url)


@pytest.fixture
async def proxied_pool(
    proxied: tuple[FaultProxy, str],
) -> AsyncIterator[Callable[..., Awaitable[ProxiedPool]]]:
    """Opens pools (min_size 1, `max_size`) through `proxied`; all closed before the proxy."""
    pools: list[ProxiedPool] = []

    async def open_pool(max_size: int = 2) -> ProxiedPool:
        p: ProxiedPool = AsyncConnectionPool(proxied[1], min_size=1, max_size=max_size, open=False)
        pools.append(p)
        await p.open(wait=True)
        return p

    yield open_pool
    for p in pools:
        await p.close()
