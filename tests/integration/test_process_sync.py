"""`SyncProcessReplyRouter`: the process reply router from synchronous code (a thread of its
own here), stopped from another thread."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any
from uuid import UUID

import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from test_process import DOMAIN, REPLIES, OrderSaga, OrderState, Step, registry

from commandbus import CommandBus, Reply, ReplyOutcome, RetryPolicy, Worker
from commandbus.process import (
    PostgresProcessRepository,
    ProcessCommand,
    ProcessMetadata,
    ProcessStatus,
)
from commandbus.sync.process import SyncProcessReplyRouter


class SyncBuiltSaga(OrderSaga):
    """Builds its commands natively in sync mode; mode "boom" makes building CHARGE fail."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.built: list[tuple[str, str, bool]] = []

    def build_command_sync(self, step: Step, state: OrderState) -> ProcessCommand[Any]:
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        self.built.append((state.order_id, str(step), in_loop))
        if state.mode == "boom":
            raise RuntimeError("cannot build")
        data = {"order_id": state.order_id, "mode": state.mode}
        return ProcessCommand(command_type=str(step).title(), data=data)


class SyncHookSaga(OrderSaga):
    def before_send_command_sync(
        self,
        process: ProcessMetadata[OrderState, Step],
        step: Step,
        command_id: UUID,
        command_payload: dict[str, Any],
        conn: Any,
    ) -> None:
        pass


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


async def test_sync_router_builds_with_build_command_sync_and_counts_health(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    bus = CommandBus(pool)
    repo = PostgresProcessRepository(pool)
    saga = SyncBuiltSaga(bus, repo, REPLIES, pool)
    worker = Worker(pool, DOMAIN, registry([]), retry_policy=RetryPolicy(backoff_schedule=[0]))
    worker_task = asyncio.create_task(worker.run(concurrency=2, poll_interval=0.05))
    sync_pool: ConnectionPool[Any] = ConnectionPool(database_url, min_size=1, open=True)
    router = SyncProcessReplyRouter(
        sync_pool, None, {"OrderSaga": saga}, REPLIES, DOMAIN,
        visibility_timeout=2, statement_timeout=1000, tsq_check_interval=0.1,
    )  # fmt: skip
    health = router.health_status
    assert (health.total_successes, health.total_failures) == (0, 0)
    thread = threading.Thread(target=router.run, kwargs={"concurrency": 2, "poll_interval": 0.05})
    thread.start()
    try:
        ok = await saga.start({"order_id": "n1"})  # first step: async start, build_command
        declined = await saga.start({"order_id": "n2", "mode": "declined"})
        boom = await saga.start({"order_id": "n3", "mode": "boom"})
        for _ in range(400):
            got = [await repo.get_by_id(DOMAIN, pid) for pid in (ok, declined)]
            if [p.status for p in got if p] == [
                ProcessStatus.COMPLETED,
                ProcessStatus.COMPENSATED,
            ] and health.total_failures >= 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"processes not finished: {got}, {health.to_dict()}")
        # every step the router sent was built by build_command_sync, off the event loop
        assert sorted(b for b in saga.built if b[0] != "n3") == [
            ("n1", "CHARGE", False), ("n2", "CHARGE", False), ("n2", "RELEASE", False),
        ]  # fmt: skip
        assert ("n3", "CHARGE", False) in saga.built
        # replies handled: n1 RESERVE + CHARGE, n2 RESERVE + CHARGE + RELEASE; n3's fails
        assert health.total_successes == 5
        assert health.total_failures >= 1 and health.last_success is not None
        boomed = await repo.get_by_id(DOMAIN, boom)
        assert boomed is not None and boomed.status is ProcessStatus.WAITING_FOR_REPLY
    finally:
        await asyncio.to_thread(router.stop, 5)
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()
        await worker.stop(timeout=5)
        await worker_task
        await bus.close()
        sync_pool.close()


def test_default_build_command_sync_runs_build_command() -> None:
    saga = OrderSaga(None, None, REPLIES, None)  # type: ignore[arg-type]
    command = saga.build_command_sync(Step.CHARGE, OrderState("x1", mode="ok"))
    expected = asyncio.run(saga.build_command(Step.CHARGE, OrderState("x1", mode="ok")))
    assert command == expected
    assert (command.command_type, command.data) == ("Charge", {"order_id": "x1", "mode": "ok"})


def test_before_send_command_sync_override_is_refused() -> None:
    pool: ConnectionPool[Any] = ConnectionPool("dbname=none", open=False)
    saga = SyncHookSaga(None, None, REPLIES, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"before_send_command_sync.*before_send_command\("):
        SyncProcessReplyRouter(pool, None, {"OrderSaga": saga}, REPLIES, DOMAIN)
    reply = Reply(command_id=UUID(int=1), correlation_id=UUID(int=2), outcome=ReplyOutcome.SUCCESS)
    process: Any = None
    with pytest.raises(TypeError, match="before_send_command_sync"):
        saga.handle_reply_sync(reply, process)
    # the async router never called the sync hook (as the predecessor's): accepted there
    SyncProcessReplyRouter(pool, None, {"OrderSaga": OrderSaga(None, None, REPLIES, None)},  # type: ignore[arg-type]
                           REPLIES, DOMAIN)  # fmt: skip


def test_handle_reply_sync_with_a_connection_says_what_to_do() -> None:
    saga = OrderSaga(None, None, REPLIES, None)  # type: ignore[arg-type]
    reply = Reply(command_id=UUID(int=1), correlation_id=UUID(int=2), outcome=ReplyOutcome.SUCCESS)
    process: Any = None
    with pytest.raises(TypeError, match=r"without conn.*SyncProcessReplyRouter"):
        saga.handle_reply_sync(reply, process, conn=object())


@pytest.mark.parametrize(("statement", "visibility"), [(30_000, 30), (0, 30), (1000, 0)])
def test_timeouts_are_validated(statement: int, visibility: int) -> None:
    pool: ConnectionPool[Any] = ConnectionPool("dbname=none", open=False)
    with pytest.raises(ValueError, match="timeout"):
        SyncProcessReplyRouter(pool, None, {}, REPLIES, DOMAIN, visibility_timeout=visibility,
                               statement_timeout=statement)  # fmt: skip


async def test_a_reply_handled_too_long_counts_as_a_stuck_thread_once() -> None:
    pool: ConnectionPool[Any] = ConnectionPool("dbname=none", open=False)
    router = SyncProcessReplyRouter(pool, None, {}, REPLIES, DOMAIN, visibility_timeout=1,
                                    statement_timeout=500)  # fmt: skip
    handling = asyncio.create_task(asyncio.sleep(10))
    fake: Any = type("FakeRouter", (), {})()
    fake.started = {handling: time.monotonic() - 7.0}  # beyond 1 s + 5 s
    watch = asyncio.create_task(router._watch_stuck(fake))
    await asyncio.sleep(2.2)  # two checks: counted once
    watch.cancel()
    handling.cancel()
    assert router.health_status.stuck_threads == 1
