"""Working: outcomes, retries, TSQ, fencing, poison guard, malformed messages, leases, stop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from itest_helpers import (
    events,
    fetch,
    function_calls,
    queue_depth,
    read_queue,
    status_of,
    wait_until,
)
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BusinessRuleException,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    RetryPolicy,
    SendRequest,
    TransientCommandError,
    Worker,
)

FAST = RetryPolicy(max_attempts=3, backoff_schedule=[0])


@asynccontextmanager
async def running(
    worker: Worker, concurrency: int = 8, **kw: Any
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run(concurrency=concurrency, poll_interval=0.05, **kw))
    try:
        yield task
    finally:
        await worker.stop(timeout=5)
        await task


async def wait_status(pool: AsyncConnectionPool[Any], domain: str, cid: UUID, status: str) -> None:
    async def check() -> bool:
        return await status_of(pool, domain, cid) == status

    await wait_until(check)


async def test_outcomes_status_result_audit_and_replies(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()

    @registry.handler("orders", "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        return {"echo": cmd.data["v"], "attempt": ctx.attempt}

    @registry.handler("orders", "Rule")
    async def rule(cmd: Command, ctx: HandlerContext) -> None:
        raise BusinessRuleException("ACCOUNT_CLOSED", "account is closed", {"account": 7})

    @registry.handler("orders", "Perm")
    async def perm(cmd: Command, ctx: HandlerContext) -> None:
        raise PermanentCommandError("DECLINED", "card declined", {"card": "x"})

    bus = CommandBus(pool)
    ids = {name: uuid4() for name in ("Ok", "Rule", "Perm")}
    corr = {name: uuid4() for name in ids}
    for name, cid in ids.items():
        await bus.send(
            "orders", name, cid, {"v": name}, correlation_id=corr[name], reply_to="orders__replies"
        )
    async with running(Worker(pool, "orders", registry, retry_policy=FAST)):
        await wait_status(pool, "orders", ids["Ok"], "COMPLETED")
        await wait_status(pool, "orders", ids["Rule"], "FAILED")
        await wait_status(pool, "orders", ids["Perm"], "IN_TROUBLESHOOTING_QUEUE")

    ok_meta = await bus.get_command("orders", ids["Ok"])
    assert ok_meta is not None and ok_meta.result == {"echo": "Ok", "attempt": 1}
    rule_meta = await bus.get_command("orders", ids["Rule"])
    assert rule_meta is not None
    assert (rule_meta.last_error_type, rule_meta.last_error_code) == (
        "BUSINESS_RULE",
        "ACCOUNT_CLOSED",
    )
    perm_meta = await bus.get_command("orders", ids["Perm"])
    assert perm_meta is not None
    assert (perm_meta.last_error_type, perm_meta.last_error_code, perm_meta.last_error_msg) == (
        "PERMANENT", "DECLINED", "card declined")  # fmt: skip

    assert await events(pool, ids["Ok"]) == ["SENT", "RECEIVED", "COMPLETED"]
    assert await events(pool, ids["Rule"]) == ["SENT", "RECEIVED", "BUSINESS_RULE_FAILED"]
    assert await events(pool, ids["Perm"]) == ["SENT", "RECEIVED", "MOVED_TO_TSQ"]
    [(details,)] = await fetch(
        pool,
        "SELECT details_json FROM commandbus.audit"
        " WHERE command_id = %s AND event_type = 'MOVED_TO_TSQ'",
        ids["Perm"],
    )  # fmt: skip
    assert details["error_code"] == "DECLINED" and details["error_details"] == {"card": "x"}

    replies = {r["command_id"]: r for r in await read_queue(pool, "orders__replies")}
    assert set(replies) == {str(ids["Ok"]), str(ids["Rule"])}  # no reply for a TSQ move
    assert replies[str(ids["Ok"])] == {
        "command_id": str(ids["Ok"]), "correlation_id": str(corr["Ok"]), "outcome": "SUCCESS",
        "result": {"echo": "Ok", "attempt": 1},
    }  # fmt: skip
    failed = replies[str(ids["Rule"])]
    assert failed["outcome"] == "FAILED" and failed["correlation_id"] == str(corr["Rule"])
    assert failed["result"]["error_code"] == "ACCOUNT_CLOSED"
    # Completed messages are deleted; TSQ and FAILED ones archived; nothing is left to claim.
    assert await queue_depth(pool, "orders__commands") == 0
    assert await fetch(pool, "SELECT count(*) FROM pgmq.a_orders__commands") == [(2,)]


async def test_transient_failures_retry_then_exhaust_to_tsq(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()
    calls: dict[str, int] = {}

    @registry.handler("orders", "Flaky")
    async def flaky(cmd: Command, ctx: HandlerContext) -> dict[str, int]:
        calls[cmd.data["name"]] = calls.get(cmd.data["name"], 0) + 1
        if cmd.data["name"] == "recovers" and ctx.attempt == 2:
            return {"attempt": ctx.attempt}
        if cmd.data["name"] == "unknown":
            raise KeyError("boom")  # any exception counts as transient
        raise TransientCommandError("TIMEOUT", "gateway timeout")

    bus = CommandBus(pool)
    always, recovers, own_max, unknown = uuid4(), uuid4(), uuid4(), uuid4()
    await bus.send("orders", "Flaky", always, {"name": "always"})
    await bus.send("orders", "Flaky", recovers, {"name": "recovers"})
    await bus.send("orders", "Flaky", own_max, {"name": "own_max"}, max_attempts=1)
    await bus.send("orders", "Flaky", unknown, {"name": "unknown"})
    async with running(Worker(pool, "orders", registry, retry_policy=FAST)):
        await wait_status(pool, "orders", always, "IN_TROUBLESHOOTING_QUEUE")
        await wait_status(pool, "orders", recovers, "COMPLETED")
        await wait_status(pool, "orders", own_max, "IN_TROUBLESHOOTING_QUEUE")
        await wait_status(pool, "orders", unknown, "IN_TROUBLESHOOTING_QUEUE")

    # The worker's policy (3) applies where the command has no max_attempts; the
    # command's own max_attempts (1) wins where it has one.
    assert calls == {"always": 3, "recovers": 2, "own_max": 1, "unknown": 3}
    assert await events(pool, always) == [
        "SENT",
        "RECEIVED", "FAILED", "RETRY_SCHEDULED",
        "RECEIVED", "FAILED", "RETRY_SCHEDULED",
        "RECEIVED", "FAILED", "RETRY_EXHAUSTED", "MOVED_TO_TSQ",
    ]  # fmt: skip
    [(details,)] = await fetch(
        pool,
        "SELECT details_json FROM commandbus.audit"
        " WHERE command_id = %s AND event_type = 'MOVED_TO_TSQ'",
        always,
    )  # fmt: skip
    assert (
        details["reason"] == "EXHAUSTED"
        and details["attempt"] == 3
        and details["max_attempts"] == 3
    )
    meta = await bus.get_command("orders", unknown)
    assert meta is not None and (meta.last_error_type, meta.last_error_code) == (
        "TRANSIENT",
        "KeyError",
    )
    meta = await bus.get_command("orders", recovers)
    assert meta is not None and meta.attempts == 2 and meta.result == {"attempt": 2}


async def test_backoff_pushes_visibility_forward(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()

    @registry.handler("orders", "Slow")
    async def fail(cmd: Command, ctx: HandlerContext) -> None:
        raise TransientCommandError("LATER", "try later")

    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "Slow", cid, {})
    policy = RetryPolicy(max_attempts=3, backoff_schedule=[40, 80])
    async with running(Worker(pool, "orders", registry, retry_policy=policy)):
        await wait_until(lambda: _has_event(pool, cid, "RETRY_SCHEDULED"))
    [(seconds,)] = await fetch(
        pool, "SELECT extract(epoch FROM vt - now()) FROM pgmq.q_orders__commands"
    )
    assert 30 < seconds <= 40
    assert await status_of(pool, "orders", cid) == "PENDING"


async def _has_event(pool: AsyncConnectionPool[Any], cid: UUID, event: str) -> bool:
    return event in await events(pool, cid)


async def test_completion_is_fenced_by_the_lease(pool: AsyncConnectionPool[Any]) -> None:
    """A worker whose lease expired cannot complete, reply for, or count the command."""
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "T", cid, {}, reply_to="orders__replies")
    first, second = Worker(pool, "orders"), Worker(pool, "orders")
    try:
        [late] = await first.receive(visibility_timeout=1)
        await asyncio.sleep(1.3)
        [current] = await second.receive(visibility_timeout=30)
        assert (late.context.attempt, current.context.attempt) == (1, 2)
        await first.complete(late, {"by": "late"})  # ignored: its lease is gone
        assert await status_of(pool, "orders", cid) == "IN_PROGRESS"
        await second.complete(current, {"by": "current"})
        await first.complete(late, {"by": "late"})  # still ignored
    finally:
        await first.close()
        await second.close()
    meta = await bus.get_command("orders", cid)
    assert (
        meta is not None and meta.status.value == "COMPLETED" and meta.result == {"by": "current"}
    )
    assert (await events(pool, cid)).count("COMPLETED") == 1
    assert len(await read_queue(pool, "orders__replies")) == 1


async def test_poison_message_goes_to_tsq_instead_of_cycling(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "Crashy", cid, {}, max_attempts=2)
    worker = Worker(pool, "orders")
    try:
        for attempt in (1, 2):  # each claim "dies": no outcome, the lease just expires
            [received] = await worker.receive(visibility_timeout=1)
            assert received.context.attempt == attempt
            await asyncio.sleep(1.2)
        assert await worker.receive(visibility_timeout=1) == []
    finally:
        await worker.close()
    meta = await bus.get_command("orders", cid)
    assert meta is not None and meta.status.value == "IN_TROUBLESHOOTING_QUEUE"
    assert meta.last_error_code == "EXHAUSTED" and meta.attempts == 3
    assert (await events(pool, cid))[-2:] == ["RETRY_EXHAUSTED", "MOVED_TO_TSQ"]
    assert await queue_depth(pool, "orders__commands") == 0


async def test_malformed_messages_go_to_tsq_without_stalling(
    pool: AsyncConnectionPool[Any],
) -> None:
    registry = HandlerRegistry()

    @registry.handler("orders", "Good")
    async def good(cmd: Command, ctx: HandlerContext) -> None:
        return None

    bus = CommandBus(pool)
    await bus.send("orders", "Warmup", uuid4(), {})  # creates the queue
    orphan = uuid4()
    async with pool.connection() as conn:
        await conn.execute("SELECT pgmq.send('orders__commands', '{\"hello\": 1}'::jsonb)")
        await conn.execute(
            "SELECT pgmq.send('orders__commands', %s::jsonb)",
            (f'{{"command_id": "{orphan}", "command_type": "Ghost"}}',),
        )
        # Not a UUID: the claim's bulk cast fails and it falls back to checking each message.
        await conn.execute(
            "SELECT pgmq.send('orders__commands', %s::jsonb)",
            ('{"command_id": "nope", "command_type": "Bad"}',),
        )
    good_id = uuid4()
    await bus.send("orders", "Good", good_id, {})
    async with running(Worker(pool, "orders", registry, retry_policy=FAST)):
        await wait_status(pool, "orders", good_id, "COMPLETED")
        await wait_status(pool, "orders", orphan, "IN_TROUBLESHOOTING_QUEUE")
    rows = await fetch(
        pool,
        "SELECT command_type, last_error_code, last_error_msg FROM commandbus.command "
        "WHERE last_error_code = 'MALFORMED_MESSAGE' ORDER BY command_type",
    )
    assert rows == [
        ("Bad", "MALFORMED_MESSAGE", "queue message has no valid command_id"),
        ("Ghost", "MALFORMED_MESSAGE", "queue message has no command row"),
        ("UNKNOWN", "MALFORMED_MESSAGE", "queue message has no valid command_id"),
    ]
    # The malformed messages are gone from the queue; only the Warmup (no handler,
    # so it is retried and may already sit in the TSQ) can still be there.
    left = await fetch(pool, "SELECT message FROM pgmq.q_orders__commands")
    assert all(row[0].get("command_type") == "Warmup" for row in left), left


async def test_extend_visibility_keeps_the_lease(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()
    extended = asyncio.Event()
    release = asyncio.Event()

    @registry.handler("orders", "Long")
    async def long(cmd: Command, ctx: HandlerContext) -> None:
        await ctx.extend_visibility(60)
        extended.set()
        await release.wait()

    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "Long", cid, {})
    other = Worker(pool, "orders")
    try:
        async with running(Worker(pool, "orders", registry, visibility_timeout=1)):
            await asyncio.wait_for(extended.wait(), 10)
            await asyncio.sleep(1.5)  # past the original lease
            [(seconds,)] = await fetch(
                pool, "SELECT extract(epoch FROM vt - now()) FROM pgmq.q_orders__commands"
            )
            assert seconds > 50
            assert await other.receive(visibility_timeout=30) == []
            release.set()
            await wait_status(pool, "orders", cid, "COMPLETED")
    finally:
        await other.close()
    meta = await bus.get_command("orders", cid)
    assert meta is not None and meta.attempts == 1


async def test_stop_finishes_in_flight_and_releases_the_rest(
    pool: AsyncConnectionPool[Any],
) -> None:
    registry = HandlerRegistry()
    started = 0
    gate = asyncio.Event()

    @registry.handler("orders", "Quick")
    async def quick(cmd: Command, ctx: HandlerContext) -> None:
        nonlocal started
        started += 1
        await asyncio.sleep(0.2)

    @registry.handler("orders", "Stuck")
    async def stuck(cmd: Command, ctx: HandlerContext) -> None:
        await gate.wait()

    bus = CommandBus(pool)
    quick_ids = [uuid4() for _ in range(4)]
    stuck_ids = [uuid4() for _ in range(2)]
    for cid in quick_ids:
        await bus.send("orders", "Quick", cid, {})
    for cid in stuck_ids:
        await bus.send("orders", "Stuck", cid, {})
    worker = Worker(pool, "orders", registry, retry_policy=FAST)
    task = asyncio.create_task(worker.run(concurrency=8, poll_interval=0.05))
    await wait_until(lambda: _all_have_event(pool, quick_ids + stuck_ids, "RECEIVED"))
    await worker.stop(timeout=1.0)  # quick ones finish inside it, stuck ones are cut off
    await task
    assert not worker.is_running
    for cid in quick_ids:  # outcomes applied before stop() returned
        assert await status_of(pool, "orders", cid) == "COMPLETED"
    for cid in stuck_ids:  # cut off: the attempt counts, retried at once (visible again)
        meta = await bus.get_command("orders", cid)
        assert meta is not None and meta.status.value == "PENDING" and meta.attempts == 1
        assert meta.last_error_code == "WORKER_STOPPED"
        assert (await events(pool, cid))[-2:] == ["FAILED", "RETRY_SCHEDULED"]
    [(visible,)] = await fetch(
        pool, "SELECT count(*) FROM pgmq.q_orders__commands WHERE vt <= clock_timestamp()"
    )
    assert visible == 2

    gate.set()
    await asyncio.sleep(0)
    async with running(Worker(pool, "orders", registry, retry_policy=FAST)):
        for cid in stuck_ids:
            await wait_status(pool, "orders", cid, "COMPLETED")


async def _all_have_event(pool: AsyncConnectionPool[Any], ids: list[UUID], event: str) -> bool:
    for cid in ids:
        if event not in await events(pool, cid):
            return False
    return True


async def test_sync_handlers_run_in_a_thread_pool(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()
    threads: set[str] = set()

    @registry.handler("orders", "Blocking")
    def blocking(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        threads.add(threading.current_thread().name)
        return {"n": cmd.data["n"] * 2}

    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(6)]
    for n, cid in enumerate(ids):
        await bus.send("orders", "Blocking", cid, {"n": n})
    async with running(Worker(pool, "orders", registry, sync_handler_threads=2)):
        for cid in ids:
            await wait_status(pool, "orders", cid, "COMPLETED")
    assert threads and all(name.startswith("rcmd-orders") for name in threads)
    assert threading.main_thread().name not in threads
    meta = await bus.get_command("orders", ids[3])
    assert meta is not None and meta.result == {"n": 6}


async def test_notify_wakes_an_idle_worker(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()

    @registry.handler("orders", "Ping")
    async def ping(cmd: Command, ctx: HandlerContext) -> None:
        return None

    bus = CommandBus(pool)
    await bus.send("orders", "Warmup", uuid4(), {})
    worker = Worker(pool, "orders", registry)
    task = asyncio.create_task(worker.run(concurrency=2, poll_interval=30.0, use_notify=True))
    try:
        await asyncio.sleep(1.0)  # idle: the next poll would be 30 s away
        cid = uuid4()
        await bus.send("orders", "Ping", cid, {})
        await wait_until(lambda: _is_status(pool, cid, "COMPLETED"), timeout=5)
    finally:
        await worker.stop(timeout=5)
        await task


async def _is_status(pool: AsyncConnectionPool[Any], cid: UUID, status: str) -> bool:
    return await status_of(pool, "orders", cid) == status


async def test_run_rejects_bad_arguments(pool: AsyncConnectionPool[Any]) -> None:
    from commandbus import ValidationError

    worker = Worker(pool, "orders", HandlerRegistry())
    with pytest.raises(ValidationError):
        await worker.run(concurrency=0)
    with pytest.raises(ValidationError):
        await worker.run(concurrency=2, poll_interval=0)
    with pytest.raises(RuntimeError, match="registry"):
        await Worker(pool, "orders").run()
    with pytest.raises(ValidationError):
        Worker(pool, "orders", visibility_timeout=0)


async def test_auto_extended_leases_outlive_the_visibility_timeout(
    pool: AsyncConnectionPool[Any],
) -> None:
    registry = HandlerRegistry()

    @registry.handler("orders", "Long")
    async def long(cmd: Command, ctx: HandlerContext) -> None:
        await asyncio.sleep(4)

    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "Long", cid, {})
    other = Worker(pool, "orders")
    worker = Worker(pool, "orders", registry, visibility_timeout=2, auto_extend_leases=True)
    try:
        async with running(worker):
            await wait_until(lambda: _has_event(pool, cid, "RECEIVED"))
            for _ in range(3):  # well past the 2 s lease, nobody else can claim it
                await asyncio.sleep(1)
                assert await other.receive(visibility_timeout=30) == []
            await wait_status(pool, "orders", cid, "COMPLETED")
    finally:
        await other.close()
    meta = await bus.get_command("orders", cid)
    assert meta is not None and meta.attempts == 1


async def test_step_api_close_releases_unfinished_leases(pool: AsyncConnectionPool[Any]) -> None:
    """A claimed command with no outcome is given back on close: attempt undone, visible now."""
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "T", cid, {})
    worker = Worker(pool, "orders")
    [received] = await worker.receive(visibility_timeout=300)
    assert received.context.attempt == 1
    await worker.close()
    meta = await bus.get_command("orders", cid)
    assert meta is not None and meta.status.value == "PENDING" and meta.attempts == 0
    assert (await events(pool, cid))[-1] == "RELEASED"
    other = Worker(pool, "orders")
    try:
        [again] = await other.receive(visibility_timeout=30)  # no 300 s wait
        assert again.command.command_id == cid and again.context.attempt == 1
    finally:
        await other.close()


async def test_batches_claimed_but_never_taken_are_released_at_shutdown(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The engine's claim loop holds what it claimed until Python takes it: an await of
    next_batch that is cancelled (its batch dropped on the floor), and a batch nobody asked
    for, lose nothing; shutdown releases both (attempt undone, visible now)."""
    from commandbus._bridge import call

    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(5)]
    for cid in ids:
        await bus.send("orders", "T", cid, {})
    worker = Worker(pool, "orders", HandlerRegistry(), visibility_timeout=300)
    native = worker._new_native(use_notify=False, poll_interval=0.05, concurrency=8)
    await call(native.start)
    taken = call(native.next_batch)
    taken.cancel()
    await wait_until(_is(lambda: native.stats()["claimed"] == 5))
    assert await call(native.shutdown) == 5
    for cid in ids:
        meta = await bus.get_command("orders", cid)
        assert meta is not None and meta.status.value == "PENDING" and meta.attempts == 0
        assert (await events(pool, cid))[-1] == "RELEASED"
    [(visible,)] = await fetch(
        pool, "SELECT count(*) FROM pgmq.q_orders__commands WHERE vt <= clock_timestamp()"
    )
    assert visible == 5


async def test_step_api_fail_variants(pool: AsyncConnectionPool[Any]) -> None:
    """The predecessor's step API: fail (retry / TSQ when exhausted), fail_permanent,
    fail_business_rule."""
    bus = CommandBus(pool)
    retry, last, perm, rule = uuid4(), uuid4(), uuid4(), uuid4()
    await bus.send("orders", "T", retry, {})
    await bus.send("orders", "T", last, {}, max_attempts=1)
    await bus.send("orders", "T", perm, {})
    await bus.send("orders", "T", rule, {}, reply_to="orders__replies")
    worker = Worker(pool, "orders", retry_policy=RetryPolicy(max_attempts=3, backoff_schedule=[45]))
    try:
        got = {r.command.command_id: r for r in await worker.receive(batch_size=10)}
        assert set(got) == {retry, last, perm, rule}
        await worker.fail(got[retry], TransientCommandError("BUSY", "busy"))
        await worker.fail(got[last], RuntimeError("boom"))
        await worker.fail_permanent(got[perm], PermanentCommandError("BAD", "bad input"))
        await worker.fail_business_rule(got[rule], BusinessRuleException("RULE", "no"))
    finally:
        await worker.close()
    assert await status_of(pool, "orders", retry) == "PENDING"
    assert (await events(pool, retry))[-2:] == ["FAILED", "RETRY_SCHEDULED"]
    assert await status_of(pool, "orders", last) == "IN_TROUBLESHOOTING_QUEUE"
    assert (await events(pool, last))[-2:] == ["RETRY_EXHAUSTED", "MOVED_TO_TSQ"]
    assert await status_of(pool, "orders", perm) == "IN_TROUBLESHOOTING_QUEUE"
    assert await status_of(pool, "orders", rule) == "FAILED"
    [reply] = await read_queue(pool, "orders__replies")
    assert reply["outcome"] == "FAILED" and reply["result"]["error_code"] == "RULE"
    # The retried one waits out its 45 s backoff: not claimable now.
    other = Worker(pool, "orders")
    try:
        assert await other.receive(batch_size=10) == []
    finally:
        await other.close()


async def test_worker_survives_its_connections_being_killed(pool: AsyncConnectionPool[Any]) -> None:
    """A database restart or failover drops every connection: the worker retries and goes on."""
    registry = HandlerRegistry()

    @registry.handler("orders", "Ping")
    async def ping(cmd: Command, ctx: HandlerContext) -> None:
        return None

    bus = CommandBus(pool)
    first, second = uuid4(), uuid4()
    await bus.send("orders", "Ping", first, {})
    async with running(Worker(pool, "orders", registry)):
        await wait_status(pool, "orders", first, "COMPLETED")
        killed = await fetch(
            pool,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name LIKE 'rcmd worker %%' AND datname = current_database()",
        )
        assert killed and all(row[0] for row in killed)
        await bus.send("orders", "Ping", second, {})
        await wait_status(pool, "orders", second, "COMPLETED")


async def test_claims_pause_while_outcomes_wait_for_a_slow_flush(
    pool: AsyncConnectionPool[Any],
) -> None:
    """Handlers faster than the database applies their outcomes: the worker stops claiming
    instead of piling up leases (each one unfinished, each one a redelivery if it expires)."""
    registry = HandlerRegistry()

    @registry.handler("orders", "Fast")
    async def fast(cmd: Command, ctx: HandlerContext) -> None:
        return None

    bus = CommandBus(pool)
    n = 400
    await bus.send_batch(
        [
            SendRequest(domain="orders", command_type="Fast", command_id=uuid4(), data={})
            for _ in range(n)
        ]
    )
    async with pool.connection() as conn:  # every COMPLETED row costs the flush 3 ms
        await conn.execute(
            "CREATE FUNCTION public.slow_finish() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(0.003); RETURN NEW; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER slow_finish BEFORE UPDATE ON commandbus.command FOR EACH ROW"
            " WHEN (NEW.status = 'COMPLETED') EXECUTE FUNCTION public.slow_finish()"
        )
    held: list[int] = []
    async with running(Worker(pool, "orders", registry), concurrency=4):

        async def all_done() -> bool:
            [(leased, done)] = await fetch(
                pool,
                "SELECT count(*) FILTER (WHERE status = 'IN_PROGRESS'),"
                " count(*) FILTER (WHERE status = 'COMPLETED') FROM commandbus.command",
            )
            held.append(int(leased))
            return int(done) == n

        await wait_until(all_done, timeout=30, interval=0.02)
    # concurrency 4: at most 4 running + 4 being claimed + 64 waiting for their flush (+ the
    # claim that crossed the line); without the pause, claims ran ahead to most of the 400.
    assert max(held) <= 80, max(held)
    assert len(held) > 10  # the flushes were slow enough to be sampled many times


async def test_no_index_covers_a_column_the_hot_path_writes(pool: AsyncConnectionPool[Any]) -> None:
    """Claims and flushes update command rows in place (HOT) only while no index, nor any
    partial index's predicate, uses a column they change; an index on one of them
    would silently cost every command a write into every index of the table."""
    hot = {"status", "attempts", "updated_at", "last_error_type", "last_error_code",
           "last_error_msg", "result"}  # fmt: skip
    rows = await fetch(
        pool,
        "SELECT i.indexrelid::regclass::text, a.attname, pg_get_expr(i.indpred, i.indrelid)"
        " FROM pg_index i"
        " LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
        " WHERE i.indrelid = 'commandbus.command'::regclass",
    )
    names = {r[0] for r in rows}
    assert {"commandbus.ix_command_tsq", "commandbus.ix_command_created"} <= names
    assert [r for r in rows if r[1] in hot] == []
    predicates = {r[2] for r in rows if r[2]}
    assert predicates and all(not any(col in p for col in hot) for p in predicates), predicates


async def test_claims_take_messages_in_the_order_they_became_visible(
    pool: AsyncConnectionPool[Any],
) -> None:
    """Sending order first; a retried command queues up behind what was already waiting
    (instead of jumping ahead by its older msg_id); a leased message is never handed out."""
    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(3)]
    for i, cid in enumerate(ids):
        await bus.send("orders", f"C{i}", cid, {})
    worker = Worker(pool, "orders", retry_policy=FAST)
    other = Worker(pool, "orders", retry_policy=FAST)
    try:
        [first] = await worker.receive()
        assert first.command.command_id == ids[0]
        [second] = await other.receive()  # the leased first one is skipped
        assert second.command.command_id == ids[1]
        await worker.fail(first, TransientCommandError("TIMEOUT", "later"))  # backoff 0
        order = [(await worker.receive())[0] for _ in range(2)]
        assert [r.command.command_id for r in order] == [ids[2], ids[0]]
        assert order[1].context.attempt == 2
        assert await worker.receive() == []  # all three are leased now
    finally:
        await worker.close()
        await other.close()


async def test_one_claim_sorts_claimable_poison_orphan_and_stale_messages(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The claim's UPDATE leaves out commands whose attempts are used up, and only the
    messages it did not claim are looked up again. One claim that reads all five kinds."""
    bus = CommandBus(pool)
    done, last, poison, normal, orphan = (uuid4() for _ in range(5))
    worker = Worker(pool, "orders")
    try:
        await bus.send("orders", "T", done, {})
        [received] = await worker.receive()
        await worker.complete(received)
        await bus.send("orders", "T", last, {}, max_attempts=2)
        await bus.send("orders", "T", poison, {}, max_attempts=1)
        first = await worker.receive(batch_size=2, visibility_timeout=1)
        assert sorted(r.context.attempt for r in first) == [1, 1]  # leases left to expire
        async with pool.connection() as conn:
            for cid in (done, orphan):  # a stale copy of a finished command; a stranger
                await conn.execute(
                    "SELECT pgmq.send('orders__commands', %s::jsonb)",
                    (f'{{"command_id": "{cid}", "command_type": "T"}}',),
                )
        await bus.send("orders", "T", normal, {})
        await asyncio.sleep(1.3)
        claimed = await worker.receive(batch_size=10, visibility_timeout=30)
    finally:
        await worker.close()  # releases `last` and `normal` (attempt undone)
    # `last` is on its final attempt (2 of 2): claimed, not mistaken for poison.
    assert {(r.command.command_id, r.context.attempt) for r in claimed} == {(last, 2), (normal, 1)}
    assert [r.msg_id for r in claimed] == sorted(r.msg_id for r in claimed)
    rows = dict(
        (cid, rest)
        for cid, *rest in await fetch(
            pool,
            "SELECT command_id, status, attempts, last_error_code FROM commandbus.command",
        )
    )
    assert rows[done] == ["COMPLETED", 1, None]
    assert rows[poison] == ["IN_TROUBLESHOOTING_QUEUE", 2, "EXHAUSTED"]
    assert rows[orphan] == ["IN_TROUBLESHOOTING_QUEUE", 1, "MALFORMED_MESSAGE"]
    assert (await events(pool, poison))[-2:] == ["RETRY_EXHAUSTED", "MOVED_TO_TSQ"]
    assert (await events(pool, done)).count("MOVED_TO_TSQ") == 0
    assert (await events(pool, last)).count("RECEIVED") == 2
    # Left in the queue: the two claimed (released); poison, orphan and stale are archived.
    left = await fetch(pool, "SELECT message->>'command_id' FROM pgmq.q_orders__commands")
    assert sorted(r[0] for r in left) == sorted([str(last), str(normal)])
    archived = await fetch(pool, "SELECT message->>'command_id' FROM pgmq.a_orders__commands")
    assert sorted(r[0] for r in archived) == sorted([str(done), str(poison), str(orphan)])


async def test_all_success_flush_writes_what_the_general_flush_writes(
    pool: AsyncConnectionPool[Any],
) -> None:
    """A flush of SUCCESS outcomes only goes through complete_commands_v1; it must leave
    the rows finish_commands_v1 leaves for SUCCESS: command row, COMPLETED audit details,
    reply, deleted message, batch counters (and the batch's completion)."""
    from commandbus import BatchCommand

    bus = CommandBus(pool)
    a, b = uuid4(), uuid4()
    commands = [
        BatchCommand("T", cid, {"n": i}, reply_to="orders__replies") for i, cid in enumerate((a, b))
    ]
    batch = await bus.create_batch("orders", commands)
    worker = Worker(pool, "orders")
    try:
        claimed = {r.command.command_id: r for r in await worker.receive(batch_size=2)}
        await _flush_both_ways(pool, claimed, a, b)
    finally:
        await worker.close()  # nothing left to release: both leases were used

    def same(rows: list[tuple[Any, ...]]) -> None:
        assert len(rows) == 2 and rows[0][1:] == rows[1][1:], rows

    same(await fetch(
        pool,
        "SELECT command_id, status, result, attempts, last_error_type, last_error_code,"
        " last_error_msg FROM commandbus.command WHERE command_id = ANY(%s) ORDER BY command_id",
        [a, b],
    ))  # fmt: skip
    same(await fetch(
        pool,
        "SELECT a.command_id, a.event_type, a.details_json - 'msg_id' FROM commandbus.audit a"
        " WHERE a.command_id = ANY(%s) AND a.event_type = 'COMPLETED' ORDER BY a.command_id",
        [a, b],
    ))  # fmt: skip
    replies = {m["command_id"]: m for m in await read_queue(pool, "orders__replies")}
    assert set(replies) == {str(a), str(b)}
    ma, mb = replies[str(a)], replies[str(b)]
    assert {k: v for k, v in ma.items() if k not in ("command_id", "correlation_id")} == {
        k: v for k, v in mb.items() if k not in ("command_id", "correlation_id")
    }
    assert mb["outcome"] == "SUCCESS" and mb["result"] == {"r": 1}
    assert await queue_depth(pool, "orders__commands") == 0
    meta = await bus.get_batch("orders", batch.batch_id)
    assert meta is not None and meta.status.value == "COMPLETED" and meta.completed_count == 2
    assert "BATCH_COMPLETED" in await events(pool, batch.batch_id)


async def _flush_both_ways(
    pool: AsyncConnectionPool[Any], claimed: dict[UUID, Any], a: UUID, b: UUID
) -> None:
    """Command a through the general flush statement, b through the all-SUCCESS one."""
    from commandbus import _sql

    assert set(claimed) == {a, b}
    general = _sql.statement("finish_commands")
    fast = _sql.statement("complete_commands")
    assert "finish_commands_v1" in general and "complete_commands_v1" in fast
    ra, rb = claimed[a], claimed[b]
    # Each command's created_at as the claim returns it to the engine (its partition).
    created = dict(
        await fetch(
            pool,
            "SELECT command_id, (extract(epoch FROM created_at) * 1000000)::bigint"
            " FROM commandbus.command WHERE command_id = ANY(%s)",
            [a, b],
        )
    )
    async with pool.connection() as conn:
        cur = psycopg.AsyncRawCursor(conn)  # the statements' own $n placeholders
        await cur.execute(
            general,
            ["orders", [a], [ra.msg_id], [ra.context.attempt], ["SUCCESS"], ['{"r": 1}'],
             [None], [None], [None], [None], [0], 3, [created[a]]],
        )  # fmt: skip
        assert await cur.fetchall() == [(a, "COMPLETED")]
        fast_args = ["orders", [b], [rb.msg_id], [rb.context.attempt], ['{"r": 1}'], [created[b]]]
        await cur.execute(fast, fast_args)
        assert await cur.fetchall() == [(b, "COMPLETED")]
        # Fenced like the general flush: a second outcome for the same lease changes nothing.
        await cur.execute(fast, [*fast_args[:4], ['{"r": 2}'], [created[b]]])
        assert await cur.fetchall() == []


async def test_engine_flushes_successes_alone_through_complete_commands(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The engine's choice of flush statement: SUCCESS outcomes only -> complete_commands_v1;
    any other outcome in the flush -> finish_commands_v1 (counted by pg_stat_user_functions)."""
    async with pool.connection() as conn:
        await conn.execute("ALTER DATABASE " + conn.info.dbname + " SET track_functions = 'pl'")
    bus = CommandBus(pool)
    ok, failed = uuid4(), uuid4()
    await bus.send("orders", "T", ok, {})
    await bus.send("orders", "T", failed, {})

    def calls(name: str) -> Awaitable[int]:
        return function_calls(pool, name)

    worker = Worker(pool, "orders")
    try:
        claimed = {r.command.command_id: r for r in await worker.receive(batch_size=2)}
        await worker.complete(claimed[ok], {"fine": True})
        await wait_until(lambda: _positive(calls("complete_commands_v1")), timeout=10)
        assert await calls("finish_commands_v1") == 0
        await worker.fail_business_rule(claimed[failed], BusinessRuleException("NO", "no"))
        await wait_until(lambda: _positive(calls("finish_commands_v1")), timeout=10)
        assert await calls("complete_commands_v1") == 1
    finally:
        await worker.close()
    assert await status_of(pool, "orders", ok) == "COMPLETED"
    assert await status_of(pool, "orders", failed) == "FAILED"


async def _positive(value: Any) -> bool:
    return bool(await value > 0)


async def test_claim_leaves_the_callers_planner_settings_alone(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The claim switches nested loops off for its UPDATE and on again for the rest; the
    function's own SET clause restores the caller's value at exit, whatever it was."""
    from commandbus import _sql

    bus = CommandBus(pool)
    await bus.send_batch([SendRequest("orders", "T", uuid4(), {}) for _ in range(3)])
    lease, claim_leased = _sql.statement("lease_messages"), _sql.statement("claim_leased")
    async with pool.connection() as conn:
        cur = psycopg.AsyncRawCursor(conn)
        for caller in ("on", "off"):
            async with conn.transaction(force_rollback=True):
                await cur.execute(f"SET LOCAL enable_nestloop = {caller}")
                await cur.execute(lease, ["orders", 30, 2])
                [(leased,)] = await cur.fetchall()
                await cur.execute(claim_leased, ["orders", leased, 3])
                assert len(await cur.fetchall()) == 2
                await cur.execute("SHOW enable_nestloop")
                assert await cur.fetchone() == (caller,)


async def test_a_lease_whose_claim_never_ran_comes_back_with_attempts_untouched(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The engine leases messages in one transaction and claims their commands in a
    second. A worker that dies between the two leaves leased messages and unchanged commands:
    once the lease expires the command is claimed as attempt 1, since no handler ran. The first
    step's asynchronous commit stays inside its own transaction."""
    from commandbus import _sql

    bus = CommandBus(pool)
    kept, gone = uuid4(), uuid4()
    await bus.send("orders", "T", kept, {})
    await bus.send("orders", "T", gone, {})
    leased = await _lease_only(pool)
    assert len(leased) == 2
    assert await status_of(pool, "orders", kept) == "PENDING"
    # Leased: invisible to other claims until the lease expires.
    worker = Worker(pool, "orders")
    try:
        assert await worker.receive(batch_size=10) == []
        # A leased message deleted before its claim (retention, an operator) is skipped.
        async with pool.connection() as conn:
            cur = psycopg.AsyncRawCursor(conn)
            await cur.execute(
                "DELETE FROM pgmq.q_orders__commands WHERE message->>'command_id' = $1",
                [str(gone)],
            )
            await cur.execute(_sql.statement("claim_leased"), ["orders", leased, 3])
            rows = await cur.fetchall()
        assert [(r[3], r[1]) for r in rows] == [(kept, 1)]
        await wait_status(pool, "orders", kept, "IN_PROGRESS")
        await asyncio.sleep(1.2)  # the lease of 1 s expires; nobody reports an outcome
        [again] = await worker.receive(batch_size=10)
        assert again.command.command_id == kept and again.context.attempt == 2
        await worker.complete(again)
    finally:
        await worker.close()
    assert await status_of(pool, "orders", kept) == "COMPLETED"
    assert await events(pool, kept) == ["SENT", "RECEIVED", "RECEIVED", "COMPLETED"]


async def test_an_expired_lease_without_a_claim_is_attempt_one_again(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The poison guard counts claims, not leases: a lease lost before its claim does
    not use up an attempt."""
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "T", cid, {}, max_attempts=1)
    assert len(await _lease_only(pool)) == 1
    await asyncio.sleep(1.2)
    worker = Worker(pool, "orders")
    try:
        # max_attempts 1: had the lost lease counted, this would be poison (TSQ) instead.
        [received] = await worker.receive()
        assert received.command.command_id == cid and received.context.attempt == 1
        await worker.complete(received)
    finally:
        await worker.close()
    assert await status_of(pool, "orders", cid) == "COMPLETED"
    assert await events(pool, cid) == ["SENT", "RECEIVED", "COMPLETED"]


async def _lease_only(pool: AsyncConnectionPool[Any]) -> list[int]:
    """The engine's first claim step alone (1 s leases, autocommit), as if the worker died
    before the second; its asynchronous commit must not leak into the session."""
    from commandbus import _sql

    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        cur = psycopg.AsyncRawCursor(conn)
        await cur.execute(_sql.statement("lease_messages"), ["orders", 1, 10])
        [(leased,)] = await cur.fetchall()
        await cur.execute("SHOW synchronous_commit")
        assert await cur.fetchone() == ("on",)
    return list(leased)


async def test_flush_failures_are_logged_as_they_happen_and_lose_nothing(
    pool: AsyncConnectionPool[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The flush statement disappears while the worker runs: each failed flush reaches logging
    (ERROR, logger commandbus.*) while the worker still runs, the outcomes stay held and are
    retried, and once the statement is back every command is applied exactly once."""
    registry = HandlerRegistry()

    @registry.handler("orders", "Ping")
    async def ping(cmd: Command, ctx: HandlerContext) -> None:
        return None

    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(20)]
    await bus.send_batch(
        [SendRequest(domain="orders", command_type="Ping", command_id=cid, data={}) for cid in ids]
    )
    signature = "commandbus.%s(TEXT, UUID[], BIGINT[], INT[], JSONB[], BIGINT[])"
    async with pool.connection() as conn:
        await conn.execute(
            f"ALTER FUNCTION {signature % 'complete_commands_v1'} RENAME TO complete_commands_off"
        )
    caplog.set_level("ERROR", logger="commandbus")
    worker = Worker(pool, "orders", registry)
    try:
        async with running(worker):

            def flush_errors() -> list[Any]:
                return [
                    r
                    for r in caplog.records
                    if r.levelname == "ERROR"
                    and r.name.startswith("commandbus")
                    and "outcome flush failed" in r.getMessage()
                ]

            async def logged() -> bool:
                return bool(flush_errors())

            await wait_until(logged, timeout=10)
            assert worker.is_running
            assert "complete_commands_v1" in flush_errors()[0].getMessage()
            [(done,)] = await fetch(
                pool, "SELECT count(*) FROM commandbus.command WHERE status = 'COMPLETED'"
            )
            assert done == 0
            async with pool.connection() as conn:
                await conn.execute(
                    f"ALTER FUNCTION {signature % 'complete_commands_off'}"
                    " RENAME TO complete_commands_v1"
                )
            for cid in ids:
                await wait_status(pool, "orders", cid, "COMPLETED")
    finally:
        async with pool.connection() as conn:
            await conn.execute(
                "DO $$ BEGIN ALTER FUNCTION "
                + signature % "complete_commands_off"
                + " RENAME TO complete_commands_v1;"
                " EXCEPTION WHEN undefined_function THEN NULL; END $$"
            )
    for cid in ids:
        assert (await events(pool, cid)).count("COMPLETED") == 1
    assert await queue_depth(pool, "orders__commands") == 0
    assert worker.stats()["flush_errors"] >= 1


async def test_a_claim_failing_for_a_missing_schema_ends_the_run(
    pool: AsyncConnectionPool[Any],
) -> None:
    """A claim failure that means the schema is gone (undefined function) ends the run with
    SchemaNotInstalledError, after the stop sequence (other claim failures are retried: see
    test_worker_survives_its_connections_being_killed)."""
    from commandbus import SchemaNotInstalledError

    registry = HandlerRegistry()

    @registry.handler("orders", "Ping")
    async def ping(cmd: Command, ctx: HandlerContext) -> None:
        return None

    lease = "commandbus.%s(TEXT, INT, INT, BOOLEAN)"
    worker = Worker(pool, "orders", registry)
    task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
    try:
        await wait_until(_is(lambda: worker.is_running and worker.stats().get("claimed") == 0))
        async with pool.connection() as conn:
            await conn.execute(f"ALTER FUNCTION {lease % 'lease_messages_v1'} RENAME TO lease_off")
        with pytest.raises(SchemaNotInstalledError):
            await asyncio.wait_for(task, 10)
        assert not worker.is_running
    finally:
        async with pool.connection() as conn:
            await conn.execute(
                "DO $$ BEGIN ALTER FUNCTION commandbus.lease_off(TEXT, INT, INT, BOOLEAN)"
                " RENAME TO lease_messages_v1; EXCEPTION WHEN undefined_function THEN NULL; END $$"
            )
        if not task.done():
            await worker.stop(timeout=1)
    # The worker works again once the schema is back.
    cid = uuid4()
    await CommandBus(pool).send("orders", "Ping", cid, {})
    async with running(Worker(pool, "orders", registry)):
        await wait_status(pool, "orders", cid, "COMPLETED")


async def test_the_retry_policy_decides_with_the_commands_own_max_attempts(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The worker's RetryPolicy decides retry or exhausted: the command's max_attempts (4) over
    the policy's (2), the schedule's last value reused past its end and rounded up."""
    registry = HandlerRegistry()
    calls = 0

    @registry.handler("orders", "Flaky")
    async def flaky(cmd: Command, ctx: HandlerContext) -> None:
        nonlocal calls
        calls += 1
        assert ctx.max_attempts == 4
        raise TransientCommandError("TIMEOUT", "gateway timeout")

    schedule: Any = [0.01]
    policy = RetryPolicy(max_attempts=2, backoff_schedule=schedule)
    cid = uuid4()
    await CommandBus(pool).send("orders", "Flaky", cid, {}, max_attempts=4)
    async with running(Worker(pool, "orders", registry, retry_policy=policy)):
        await wait_status(pool, "orders", cid, "IN_TROUBLESHOOTING_QUEUE")
    assert calls == 4
    rows = await fetch(
        pool,
        "SELECT event_type, details_json FROM commandbus.audit WHERE command_id = %s"
        " AND event_type IN ('RETRY_SCHEDULED', 'RETRY_EXHAUSTED', 'MOVED_TO_TSQ')"
        " ORDER BY audit_id",
        cid,
    )
    assert [r[0] for r in rows] == ["RETRY_SCHEDULED"] * 3 + ["RETRY_EXHAUSTED", "MOVED_TO_TSQ"]
    assert [r[1]["backoff_seconds"] for r in rows[:3]] == [1, 1, 1]
    assert rows[3][1] == {"msg_id": rows[3][1]["msg_id"], "attempt": 4, "max_attempts": 4}
    assert rows[4][1]["reason"] == "EXHAUSTED" and rows[4][1]["max_attempts"] == 4


def _is(check: Any) -> Any:
    async def wrapped() -> bool:
        return bool(check())

    return wrapped
