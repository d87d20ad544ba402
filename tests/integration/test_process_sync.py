"""`SyncProcessReplyRouter`: the process reply router from synchronous code (a thread of its
own here), stopped from another thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from test_process import DOMAIN, REPLIES, OrderSaga, registry

from commandbus import CommandBus, RetryPolicy, Worker
from commandbus.process import PostgresProcessRepository, ProcessStatus
from commandbus.sync.process import SyncProcessReplyRouter


async def test_sync_router_runs_a_saga_to_the_end(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    bus = CommandBus(pool)
    repo = PostgresProcessRepository(pool)
    saga = OrderSaga(bus, repo, REPLIES, pool)
    worker = Worker(pool, DOMAIN, registry([]), retry_policy=RetryPolicy(backoff_schedule=[0]))
    worker_task = asyncio.create_task(worker.run(concurrency=2, poll_interval=0.05))
    sync_pool: ConnectionPool[Any] = ConnectionPool(database_url, min_size=1, open=True)
    router = SyncProcessReplyRouter(
        sync_pool, None, {"OrderSaga": saga}, REPLIES, DOMAIN,
        visibility_timeout=5, statement_timeout=4000, tsq_check_interval=0.1,
    )  # fmt: skip
    thread = threading.Thread(target=router.run, kwargs={"concurrency": 2, "poll_interval": 0.05})
    thread.start()
    try:
        ok = await saga.start({"order_id": "s1"})
        declined = await saga.start({"order_id": "s2", "mode": "declined"})
        for _ in range(400):
            got = [await repo.get_by_id(DOMAIN, pid) for pid in (ok, declined)]
            if [p.status for p in got if p] == [ProcessStatus.COMPLETED, ProcessStatus.COMPENSATED]:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"processes not finished: {got}")
        assert router.is_running and router.domain == DOMAIN and router.reply_queue == REPLIES
    finally:
        await asyncio.to_thread(router.stop, 5)
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()
        await worker.stop(timeout=5)
        await worker_task
        await bus.close()
        sync_pool.close()


def test_statement_timeout_must_be_below_the_visibility_timeout() -> None:
    pool: ConnectionPool[Any] = ConnectionPool("dbname=none", open=False)
    with pytest.raises(ValueError, match="statement_timeout"):
        SyncProcessReplyRouter(pool, None, {}, REPLIES, DOMAIN, visibility_timeout=5,
                               statement_timeout=5000)  # fmt: skip


def test_stop_before_run_returns_at_once() -> None:
    pool: ConnectionPool[Any] = ConnectionPool("dbname=none", open=False)
    router = SyncProcessReplyRouter(pool, None, {}, REPLIES, DOMAIN)
    router.stop(1)
    assert not router.is_running
