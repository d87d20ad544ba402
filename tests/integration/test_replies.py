"""ReplyConsumer: replies awaited by correlation id, from a real Worker and by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import pytest
from itest_helpers import fetch, queue_depth
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BusinessRuleException,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    ReplyOutcome,
    RetryPolicy,
    ValidationError,
    Worker,
    WorkerStoppedError,
)
from commandbus.pgmq import PgmqClient
from commandbus.replies import ReplyConsumer, reply_from_message, wait_for_reply

REPLIES = "orders__replies"
FAST = RetryPolicy(max_attempts=3, backoff_schedule=[0])


def _registry() -> HandlerRegistry:
    registry = HandlerRegistry()

    @registry.handler("orders", "Quote")
    async def quote(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        await asyncio.sleep(float(cmd.data.get("sleep", 0)))
        return {"price": cmd.data["qty"] * 10}

    @registry.handler("orders", "Reject")
    async def reject(cmd: Command, ctx: HandlerContext) -> None:
        raise BusinessRuleException("OUT_OF_STOCK", "no stock left", {"sku": "A1"})

    return registry


@asynccontextmanager
async def running_worker(pool: AsyncConnectionPool[Any]) -> AsyncIterator[Worker]:
    worker = Worker(pool, "orders", _registry(), retry_policy=FAST)
    task = asyncio.create_task(worker.run(concurrency=8, poll_interval=0.05))
    try:
        yield worker
    finally:
        await worker.stop(timeout=5)
        await task


async def test_success_reply_after_worker_completes(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    cid, corr = uuid4(), uuid4()
    await bus.send("orders", "Quote", cid, {"qty": 3}, correlation_id=corr, reply_to=REPLIES)
    async with running_worker(pool), ReplyConsumer(pool, REPLIES) as replies:
        reply = await replies.wait_for(corr, timeout=20)
    assert reply.outcome is ReplyOutcome.SUCCESS
    assert (reply.command_id, reply.correlation_id) == (cid, corr)
    assert reply.data == {"price": 30}
    assert reply.error_code is None and reply.error_message is None
    assert await queue_depth(pool, REPLIES) == 0  # consumed replies are deleted
    await bus.close()


async def test_failed_reply_from_business_rule(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    async with running_worker(pool), ReplyConsumer(pool, REPLIES) as replies:
        reply = await replies.request(bus, "orders", "Reject", {"qty": 1}, timeout=20)
    assert reply.outcome is ReplyOutcome.FAILED
    assert reply.error_code == "OUT_OF_STOCK"
    assert reply.error_message == "no stock left"
    assert reply.data is not None and reply.data["error_details"] == {"sku": "A1"}
    await bus.close()


async def test_concurrent_waiters_share_one_loop(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    async with running_worker(pool), ReplyConsumer(pool, REPLIES) as replies:
        # The slow one is sent first, so the fast one's reply arrives first.
        slow = asyncio.create_task(
            replies.request(bus, "orders", "Quote", {"qty": 1, "sleep": 1.5}, timeout=20)
        )
        fast_corr = uuid4()
        await asyncio.sleep(0.05)
        fast = asyncio.create_task(replies.wait_for(fast_corr, timeout=20))
        await asyncio.sleep(0)
        assert replies.waiting == 2
        loops = [t for t in asyncio.all_tasks() if t.get_name().startswith("rcmd-replies-")]
        assert len(loops) == 1
        await bus.send(
            "orders", "Quote", uuid4(), {"qty": 2}, correlation_id=fast_corr, reply_to=REPLIES
        )
        fast_reply = await fast
        assert not slow.done()
        slow_reply = await slow
    assert fast_reply.correlation_id == fast_corr and fast_reply.data == {"price": 20}
    assert slow_reply.data == {"price": 10}
    assert slow_reply.correlation_id not in (None, fast_corr)
    await bus.close()


async def test_many_requests_in_flight(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    async with running_worker(pool), ReplyConsumer(pool, REPLIES) as replies:
        results = await asyncio.gather(
            *(replies.request(bus, "orders", "Quote", {"qty": i}, timeout=20) for i in range(20))
        )
    assert [r.data for r in results] == [{"price": i * 10} for i in range(20)]
    assert await queue_depth(pool, REPLIES) == 0
    await bus.close()


async def test_timeout(pool: AsyncConnectionPool[Any]) -> None:
    async with ReplyConsumer(pool, REPLIES) as replies:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await replies.wait_for(uuid4(), timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 3
        assert replies.waiting == 0
    with pytest.raises(TimeoutError):
        await wait_for_reply(pool, REPLIES, uuid4(), timeout=0.2)


async def test_unmatched_replies_stay_and_early_replies_are_served(
    pool: AsyncConnectionPool[Any],
) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(REPLIES)
    other, early = uuid4(), uuid4()

    def message(corr: Any, outcome: str = "SUCCESS") -> dict[str, Any]:
        return {"command_id": str(uuid4()), "correlation_id": str(corr), "outcome": outcome}

    await pgmq.send(REPLIES, message(other))
    async with ReplyConsumer(pool, REPLIES, visibility_timeout=4) as replies:
        waiting = asyncio.create_task(replies.wait_for(uuid4(), timeout=5))
        await pgmq.send(REPLIES, message(early))
        await asyncio.sleep(0.3)  # the loop has read both without a waiter for them
        t0 = time.monotonic()
        reply = await replies.wait_for(early, timeout=5)
        assert reply.correlation_id == early
        assert time.monotonic() - t0 < 2.0  # from memory, not after the visibility timeout
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    # The reply nobody waited for is still in the queue for its owner.
    rows = await fetch(pool, f"SELECT message->>'correlation_id' FROM pgmq.q_{REPLIES}")
    assert rows == [(str(other),)]


async def test_malformed_replies_are_archived_and_canceled_mapped(
    pool: AsyncConnectionPool[Any],
) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(REPLIES)
    corr, cid = uuid4(), uuid4()
    await pgmq.send(REPLIES, {"garbage": True})
    await pgmq.send(REPLIES, {"command_id": str(uuid4()), "outcome": "SUCCESS"})  # no corr
    await pgmq.send(
        REPLIES,
        {"command_id": str(cid), "correlation_id": str(corr), "outcome": "CANCELED",
         "reason": "operator gave up"},
    )  # fmt: skip
    async with ReplyConsumer(pool, REPLIES) as replies:
        reply = await replies.wait_for(str(corr), timeout=5)
    assert reply.outcome is ReplyOutcome.CANCELED
    assert reply.command_id == cid and reply.error_message == "operator gave up"
    assert await queue_depth(pool, REPLIES) == 0
    assert await fetch(pool, f"SELECT count(*) FROM pgmq.a_{REPLIES}") == [(2,)]


async def test_close_fails_waiters_and_rejects_new_ones(pool: AsyncConnectionPool[Any]) -> None:
    replies = ReplyConsumer(pool, REPLIES)
    waiting = asyncio.create_task(replies.wait_for(uuid4(), timeout=10))
    await asyncio.sleep(0.1)
    await replies.close()
    with pytest.raises(WorkerStoppedError):
        await waiting
    with pytest.raises(WorkerStoppedError):
        await replies.wait_for(uuid4(), timeout=1)


def test_reply_from_message_mapping() -> None:
    cid, corr = uuid4(), uuid4()
    ok = reply_from_message(
        {"command_id": str(cid), "correlation_id": str(corr), "outcome": "SUCCESS", "result": 5}
    )
    assert ok.data == {"value": 5} and ok.correlation_id == corr
    failed = reply_from_message(
        {"command_id": str(cid), "correlation_id": None, "outcome": "FAILED",
         "result": {"error_code": "E1", "error_message": "bad", "error_details": {}}}
    )  # fmt: skip
    assert (failed.error_code, failed.error_message, failed.correlation_id) == ("E1", "bad", None)
    with pytest.raises(ValueError):
        reply_from_message({"command_id": "nope", "outcome": "SUCCESS"})
    with pytest.raises(ValueError):
        reply_from_message({"command_id": str(cid), "outcome": "MAYBE"})


async def test_argument_validation(pool: AsyncConnectionPool[Any]) -> None:
    with pytest.raises(ValidationError):
        ReplyConsumer(pool, "Bad Queue")
    with pytest.raises(ValidationError):
        ReplyConsumer(pool, REPLIES, poll_interval=0)
    async with ReplyConsumer(pool, REPLIES) as replies:
        with pytest.raises(ValidationError):
            await replies.wait_for("not-a-uuid")
        with pytest.raises(ValidationError):
            await replies.wait_for(uuid4(), timeout=-1)
