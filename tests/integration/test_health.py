"""Health of the async Worker: liveness (its loop turns), readiness (the database answers),
the predecessor's HealthStatus states, and the HTTP probes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import pytest
from itest_helpers import wait_until
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from commandbus import Command, CommandBus, HandlerContext, HandlerRegistry, RetryPolicy, Worker
from commandbus.health import WorkerHealth
from commandbus.metrics import start_metrics_server
from commandbus.sync.health import HealthState

DOMAIN = "healthy"


async def until(condition: Callable[[], bool]) -> None:
    async def check() -> bool:
        return condition()

    await wait_until(check)


def _probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_live_ready_states_and_http_probes(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()

    @registry.handler(DOMAIN, "Fail")
    async def fail(cmd: Command, ctx: HandlerContext) -> None:
        raise ValueError("boom")

    @registry.handler(DOMAIN, "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> None:
        return None

    @registry.handler(DOMAIN, "Block")
    async def block(cmd: Command, ctx: HandlerContext) -> None:
        time.sleep(1.0)  # noqa: ASYNC251 - blocks the event loop: liveness must notice

    worker = Worker(pool, DOMAIN, registry, retry_policy=RetryPolicy(max_attempts=1))
    health = WorkerHealth(worker, beat_interval=0.05, liveness_timeout=0.4, check_interval=0.1)
    server = start_metrics_server(0, registry=CollectorRegistry(), health=health)
    try:
        assert not health.live() and not health.ready()  # not running yet
        code, body = await asyncio.to_thread(_probe, server.port, "/health/live")
        assert code == 503 and body["live"] is False

        task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
        await until(lambda: health.ready())
        code, body = await asyncio.to_thread(_probe, server.port, "/health/ready")
        assert code == 200 and body["ready"] is True and body["state"] == "HEALTHY"
        assert body["domain"] == DOMAIN and body["database_error"] is None

        bus = CommandBus(pool)
        for _ in range(10):  # FAILURE_THRESHOLD failures in a row
            await bus.send(DOMAIN, "Fail", uuid4(), {})
        await until(lambda: health.status.total_failures == 10)
        assert health.status.state is HealthState.DEGRADED
        assert health.live() and health.ready()  # degraded is still alive and ready
        await bus.send(DOMAIN, "Ok", uuid4(), {})
        await until(lambda: health.status.total_successes == 1)
        assert health.status.state is HealthState.HEALTHY

        # a handler blocking the loop: the probe (another thread) sees it is not live
        seen: list[bool] = []
        probe = threading.Timer(0.8, lambda: seen.append(health.live()))
        probe.start()
        await bus.send(DOMAIN, "Block", uuid4(), {})
        await asyncio.to_thread(probe.join)
        assert seen == [False]
        await until(lambda: health.live())

        await worker.stop(timeout=5)
        await task
        assert not health.live() and not health.ready()
        code, body = await asyncio.to_thread(_probe, server.port, "/health/ready")
        assert code == 503 and body["running"] is False
    finally:
        server.close()


async def test_not_ready_when_the_database_does_not_answer(database_url: str) -> None:
    async with AsyncConnectionPool(database_url, min_size=1, max_size=2) as apool:
        worker = Worker(apool, DOMAIN, HandlerRegistry())
        health = WorkerHealth(worker, check_timeout=1.0)
        assert await health.check_database() is True
    # the pool is closed now: the check fails and says why
    assert await health.check_database() is False
    assert health.to_dict()["database_error"]


def test_a_sync_worker_is_refused(database_url: str) -> None:
    from psycopg_pool import ConnectionPool

    from commandbus.sync import SyncWorker

    with ConnectionPool(database_url, min_size=1, max_size=1, open=True) as spool:
        sync_worker = SyncWorker(spool, DOMAIN, HandlerRegistry())
        with pytest.raises(TypeError, match="health_status"):
            WorkerHealth(sync_worker)  # type: ignore[arg-type]
