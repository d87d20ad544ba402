"""commandbus.testing.drain_queue: every queued command of a domain worked in-process until the
queue is idle, their outcomes returned in send order."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any
from uuid import UUID, uuid4

import pytest
from itest_helpers import events, fetch, queue_depth
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BusinessRuleException,
    Command,
    CommandBus,
    CommandStatus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    RetryPolicy,
    SendRequest,
    TransientCommandError,
)
from commandbus.testing import drain_queue

Pool = AsyncConnectionPool[Any]


def _registry(calls: list[str] | None = None) -> HandlerRegistry:
    """orders: Ok (returns), Flaky (fails transiently on its first attempt), Broken (always
    transient), Permanent, Rule (business rule), Spawn (sends an Ok to the same domain)."""
    registry = HandlerRegistry()
    seen = calls if calls is not None else []

    @registry.handler("orders", "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        seen.append(f"Ok:{cmd.data.get('n')}")
        return {"n": cmd.data.get("n")}

    @registry.handler("orders", "Flaky")
    async def flaky(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        seen.append(f"Flaky:{ctx.attempt}")
        if ctx.attempt == 1:
            raise TransientCommandError("GATEWAY_TIMEOUT", "try again")
        return {"attempt": ctx.attempt}

    @registry.handler("orders", "Broken")
    async def broken(cmd: Command, ctx: HandlerContext) -> None:
        seen.append("Broken")
        raise RuntimeError("always broken")

    @registry.handler("orders", "Permanent")
    async def permanent(cmd: Command, ctx: HandlerContext) -> None:
        raise PermanentCommandError("BAD_DATA", "cannot ever work")

    @registry.handler("orders", "Rule")
    def rule(cmd: Command, ctx: HandlerContext) -> None:  # a plain def handler
        raise BusinessRuleException("OUT_OF_STOCK", "no stock left")

    return registry


async def _send(pool: Pool, command_type: str, data: dict[str, Any] | None = None) -> UUID:
    command_id = uuid4()
    await CommandBus(pool).send("orders", command_type, command_id, data or {})
    return command_id


async def test_nothing_queued_returns_nothing(pool: Pool) -> None:
    """A domain that never had a command (its queue does not even exist) drains at once."""
    assert await drain_queue(pool, "orders", _registry()) == []
    await _send(pool, "Ok")
    await drain_queue(pool, "orders", _registry())
    assert await drain_queue(pool, "orders", _registry()) == []  # worked ones are not returned


async def test_outcomes_in_send_order(pool: Pool) -> None:
    calls: list[str] = []
    ids = [await _send(pool, "Ok", {"n": n}) for n in range(5)]
    permanent = await _send(pool, "Permanent")
    rule = await _send(pool, "Rule")

    outcomes = await drain_queue(pool, "orders", _registry(calls))

    assert [m.command_id for m in outcomes] == [*ids, permanent, rule]
    assert calls == [f"Ok:{n}" for n in range(5)]  # concurrency=1: one at a time, queue order
    for n, meta in enumerate(outcomes[:5]):
        assert meta.status == CommandStatus.COMPLETED
        assert meta.attempts == 1
        assert meta.result == {"n": n}
    tsq, failed = outcomes[5:]
    assert tsq.status == CommandStatus.IN_TROUBLESHOOTING_QUEUE
    assert (tsq.last_error_type, tsq.last_error_code) == ("PERMANENT", "BAD_DATA")
    assert failed.status == CommandStatus.FAILED
    assert failed.last_error_code == "OUT_OF_STOCK"
    assert await queue_depth(pool, "orders__commands") == 0  # every outcome applied


async def test_a_retry_with_backoff_is_not_waited_for(pool: Pool) -> None:
    """The default backoff (10 s): the drain returns at once with the command PENDING after
    its failed attempt; a second drain does not see it either until the backoff ends."""
    flaky = await _send(pool, "Flaky")
    t0 = time.monotonic()
    [meta] = await drain_queue(pool, "orders", _registry())
    assert time.monotonic() - t0 < 5
    assert meta.command_id == flaky
    assert meta.status == CommandStatus.PENDING
    assert meta.attempts == 1
    assert meta.last_error_code == "GATEWAY_TIMEOUT"
    assert "RETRY_SCHEDULED" in await events(pool, flaky)
    assert await drain_queue(pool, "orders", _registry()) == []
    assert await queue_depth(pool, "orders__commands") == 1


async def test_a_retry_without_backoff_is_worked(pool: Pool) -> None:
    """A retry visible at once (backoff 0) is worked in the same drain, until its attempts
    are used up; the command appears once."""
    calls: list[str] = []
    flaky = await _send(pool, "Flaky")
    broken = await _send(pool, "Broken")
    outcomes = await drain_queue(
        pool, "orders", _registry(calls), retry_policy=RetryPolicy(3, backoff_schedule=[0])
    )
    assert [m.command_id for m in outcomes] == [flaky, broken]
    assert (outcomes[0].status, outcomes[0].attempts) == (CommandStatus.COMPLETED, 2)
    assert (outcomes[1].status, outcomes[1].attempts) == (CommandStatus.IN_TROUBLESHOOTING_QUEUE, 3)
    assert outcomes[1].last_error_code == "RuntimeError"
    assert calls.count("Broken") == 3


async def test_wait_for_retries(pool: Pool) -> None:
    """wait_for_retries=True waits out the backoff (1 s here) and works the retry."""
    flaky = await _send(pool, "Flaky")
    t0 = time.monotonic()
    [meta] = await drain_queue(
        pool,
        "orders",
        _registry(),
        wait_for_retries=True,
        retry_policy=RetryPolicy(3, backoff_schedule=[1]),
    )
    assert time.monotonic() - t0 >= 1
    assert (meta.command_id, meta.status, meta.attempts) == (flaky, CommandStatus.COMPLETED, 2)


async def test_commands_sent_by_handlers_are_worked(pool: Pool) -> None:
    """A handler sending into the same domain: the new command is worked in the same drain
    (also one sent by a handler of that command, three levels deep)."""
    registry = _registry()
    bus = CommandBus(pool)

    @registry.handler("orders", "Spawn")
    async def spawn(cmd: Command, ctx: HandlerContext) -> None:
        depth = int(cmd.data["depth"])
        if depth < 3:
            await bus.send("orders", "Spawn", uuid4(), {"depth": depth + 1})

    first = await _send(pool, "Spawn", {"depth": 1})
    outcomes = await drain_queue(pool, "orders", registry)
    assert len(outcomes) == 3
    assert outcomes[0].command_id == first
    assert all(m.status == CommandStatus.COMPLETED for m in outcomes)


async def test_concurrency_and_sync_handlers(pool: Pool) -> None:
    registry = HandlerRegistry()

    @registry.handler("orders", "Sync")
    def sync(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        time.sleep(0.001)
        return {"n": cmd.data["n"]}

    requests = [SendRequest("orders", "Sync", uuid4(), {"n": n}) for n in range(200)]
    await CommandBus(pool).send_batch(requests)
    outcomes = await drain_queue(pool, "orders", registry, concurrency=16)
    assert [m.command_id for m in outcomes] == [r.command_id for r in requests]
    assert [m.result for m in outcomes] == [{"n": n} for n in range(200)]
    assert {m.status for m in outcomes} == {CommandStatus.COMPLETED}


async def test_other_domains_are_left_alone(pool: Pool) -> None:
    other = uuid4()
    await CommandBus(pool).send("billing", "Ok", other, {})
    mine = await _send(pool, "Ok")
    assert [m.command_id for m in await drain_queue(pool, "orders", _registry())] == [mine]
    meta = await CommandBus(pool).get_command("billing", other)
    assert meta is not None and meta.status == CommandStatus.PENDING


async def test_timeout(pool: Pool) -> None:
    """A handler that never ends: TimeoutError after `timeout`; the handler is cancelled and
    its attempt recorded (retried at once), so nothing is left leased."""
    registry = HandlerRegistry()
    started = asyncio.Event()

    @registry.handler("orders", "Hang")
    async def hang(cmd: Command, ctx: HandlerContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    hung = await _send(pool, "Hang")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"not idle after 0\.5 s"):
        await drain_queue(pool, "orders", registry, timeout=0.5)
    assert started.is_set()
    assert time.monotonic() - t0 < 10
    meta = await CommandBus(pool).get_command("orders", hung)
    assert meta is not None
    assert (meta.status, meta.last_error_code) == (CommandStatus.PENDING, "WORKER_STOPPED")
    # One attempt: the drain's deadline ends it, also when the handler was handed out just
    # after an idle check (the graceful stop cuts it off at the deadline; before, that stop
    # ended before the deadline, a second round claimed the retried command again, and a claim
    # aborted by a stop budget of nothing left it IN_PROGRESS).
    assert meta.attempts == 1
    [(leased,)] = await fetch(
        pool,
        "SELECT count(*) FROM pgmq.q_orders__commands WHERE vt > clock_timestamp()",
    )
    assert leased == 0


async def test_a_missing_handler_is_an_outcome(pool: Pool) -> None:
    """No handler for the command type: a transient failure like any other (as in production)."""
    unknown = await _send(pool, "Unknown")
    [meta] = await drain_queue(pool, "orders", _registry())
    assert meta.command_id == unknown
    assert meta.status == CommandStatus.PENDING
    assert meta.last_error_code == "HandlerNotFoundError"


async def test_without_the_schema(pg_admin_dsn: str) -> None:
    from commandbus import SchemaNotInstalledError
    from commandbus.embedded import create_database, drop_database

    name = f"rcmd_drain_noschema_{os.getpid()}"
    dsn = create_database(pg_admin_dsn, name)
    try:
        async with AsyncConnectionPool(dsn, open=False) as empty:
            with pytest.raises(SchemaNotInstalledError, match="setup_database"):
                await drain_queue(empty, "orders", _registry())
    finally:
        drop_database(pg_admin_dsn, name)
