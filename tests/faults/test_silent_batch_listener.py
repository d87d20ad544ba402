"""The batch-completion listener on a connection that goes silent (issue 15): its LISTEN
connection goes through a TCP proxy that stops forwarding; the batch completes meanwhile (a
worker straight to the server), its NOTIFY never arrives. The listener's next check of the
pending batches gets no answer within `LISTENER_CALL_TIMEOUT`: it drops the connection,
reconnects (new connections pass) and fires the callback, once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from proxy import FaultProxy
from psycopg_pool import AsyncConnectionPool

import commandbus.batch as batch_mod
from commandbus import (
    BatchCommand,
    BatchMetadata,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    Worker,
)

pytestmark = [pytest.mark.timeout(60)]


async def test_listener_replaces_a_silent_connection_and_fires_the_callback(
    pool: AsyncConnectionPool[Any],
    proxied: tuple[FaultProxy, str],
    proxied_pool: Callable[..., Awaitable[AsyncConnectionPool[Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 0.5)
    monkeypatch.setattr(batch_mod, "LISTENER_CALL_TIMEOUT", 2.0)
    proxy, dsn = proxied
    behind = await proxied_pool(max_size=2)
    bus = CommandBus(behind)
    fired: list[BatchMetadata] = []
    try:
        result = await bus.create_batch(
            "silent",
            [BatchCommand("Ok", uuid.uuid4(), {"i": i}) for i in range(3)],
            on_complete=fired.append,
        )
        listener = batch_mod._listeners[dsn]
        await asyncio.wait_for(listener.listening.wait(), 10)
        assert listener.connections == 1
        proxy.freeze()  # the listener's connection (and the pool's) go silent

        registry = HandlerRegistry()

        @registry.handler("silent", "Ok")
        async def ok(cmd: Command, ctx: HandlerContext) -> None:
            return None

        worker = Worker(pool, "silent", registry)  # straight to the server
        task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
        t0 = time.monotonic()
        try:
            while not fired and time.monotonic() - t0 < 20:  # noqa: ASYNC110 - set by a callback
                await asyncio.sleep(0.05)
        finally:
            await worker.stop(timeout=5)
            await task
        assert fired, "the callback never fired: the listener waited on a silent connection"
        assert [b.batch_id for b in fired] == [result.batch_id]
        # Check interval + call deadline + reconnect, with room for a busy machine.
        assert time.monotonic() - t0 < 10
        assert listener.connections >= 2, "it reconnected"
    finally:
        await bus.close()
        proxy.reset()
