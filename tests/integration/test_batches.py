"""Batches: atomic creation, queries, exact counters under a real Worker, on_complete exactly
once (NOTIFY listener, checks after LISTEN / reconnect / registration, poll fallback), and a
batch finished by a worker in another process."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import pytest_asyncio
from itest_helpers import fetch, queue_depth, read_queue, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BatchCommand,
    BatchMetadata,
    BatchStatus,
    BusinessRuleException,
    Command,
    CommandBus,
    CommandStatus,
    DuplicateCommandError,
    HandlerContext,
    HandlerRegistry,
    InvalidOperationError,
    PermanentCommandError,
    RetryPolicy,
    TransientCommandError,
    ValidationError,
    Worker,
)
from commandbus import batch as batch_mod
from commandbus.batch import (
    DuplicateBatchError,
    check_and_invoke_batch_callback,
    get_batch_callback,
    invoke_batch_callback,
    register_batch_callback,
)
from commandbus.ops import TroubleshootingQueue
from commandbus.repositories.batch import PostgresBatchRepository

FAST = RetryPolicy(max_attempts=3, backoff_schedule=[0])
FINISHER = Path(__file__).resolve().parents[1] / "e2e" / "batch_finisher.py"


@pytest_asyncio.fixture(autouse=True)
async def _clean_registry() -> AsyncIterator[None]:
    """No callback or listener outlives its test (each test has its own database)."""
    yield
    batch_mod.clear_all_callbacks()
    for listener in list(batch_mod._listeners.values()):
        await listener.stop()


def cmds(*types: str) -> list[BatchCommand]:
    return [
        BatchCommand(command_type=t, command_id=uuid4(), data={"i": i}) for i, t in enumerate(types)
    ]


def counters(b: BatchMetadata | None) -> tuple[Any, ...]:
    assert b is not None
    return (b.status, b.completed_count, b.failed_count, b.canceled_count,
            b.in_troubleshooting_count)  # fmt: skip


async def count_rows(pool: AsyncConnectionPool[Any]) -> tuple[int, int, int]:
    [(batches, commands, audits)] = await fetch(
        pool,
        "SELECT (SELECT count(*) FROM commandbus.batch), (SELECT count(*) FROM commandbus.command),"
        " (SELECT count(*) FROM commandbus.audit)",
    )
    return batches, commands, audits


async def batch_events(pool: AsyncConnectionPool[Any], batch_id: UUID) -> list[str]:
    rows = await fetch(
        pool, "SELECT event_type FROM commandbus.audit WHERE command_id = %s ORDER BY audit_id",
        batch_id,
    )  # fmt: skip
    return [r[0] for r in rows]


async def test_create_batch_writes_batch_commands_messages_and_audit(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    commands = cmds("A", "B", "C")
    corr = uuid4()
    commands[1] = BatchCommand("B", commands[1].command_id, {"x": 1}, correlation_id=corr,
                               reply_to="billing__replies", max_attempts=7)  # fmt: skip
    result = await bus.create_batch("billing", commands, name="January", custom_data={"run": 1})
    assert result.total_commands == 3
    assert [r.command_id for r in result.command_results] == [c.command_id for c in commands]

    batch = await bus.get_batch("billing", result.batch_id)
    assert batch is not None
    assert (batch.domain, batch.batch_type, batch.name, batch.custom_data) == (
        "billing", "COMMAND", "January", {"run": 1})  # fmt: skip
    assert counters(batch) == (BatchStatus.PENDING, 0, 0, 0, 0) and batch.total_count == 3
    assert batch.started_at is None and batch.completed_at is None

    listed = await bus.list_batch_commands("billing", result.batch_id)
    assert [c.command_id for c in listed] == [c.command_id for c in commands]
    assert all(c.batch_id == result.batch_id and c.status == CommandStatus.PENDING for c in listed)
    assert [c.msg_id for c in listed] == [r.msg_id for r in result.command_results]
    assert (listed[1].correlation_id, listed[1].reply_to, listed[1].max_attempts) == (
        corr, "billing__replies", 7)  # fmt: skip
    messages = await read_queue(pool, "billing__commands")
    assert messages[1] == {"domain": "billing", "command_type": "B", "command_id": str(
        commands[1].command_id), "correlation_id": str(corr), "reply_to": "billing__replies",
        "data": {"x": 1}}  # fmt: skip
    trail = await bus.get_audit_trail(commands[0].command_id)
    assert trail[0].event_type == "SENT" and trail[0].details is not None
    assert trail[0].details["batch_id"] == str(result.batch_id)

    # A given batch_id is kept; a PROCESS batch is a batch_type like any other.
    own = uuid4()
    again = await bus.create_batch("billing", cmds("A"), batch_id=own, batch_type="PROCESS")
    assert again.batch_id == own
    got = await bus.get_batch("billing", own)
    assert got is not None and got.batch_type == "PROCESS" and got.name is None


async def test_bad_input_raises_before_anything_is_written(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    dup = uuid4()
    bad: list[tuple[type[Exception], dict[str, Any]]] = [
        (ValidationError, {"commands": []}),
        (DuplicateCommandError, {"commands": [BatchCommand("A", dup, {}),
                                              BatchCommand("B", dup, {})]}),
        (ValidationError, {"commands": cmds("A"), "batch_type": "OTHER"}),
        (ValidationError, {"commands": cmds("A"), "custom_data": [1, 2]}),
        (ValidationError, {"commands": cmds("A"), "batch_id": "not-a-uuid"}),
        (ValidationError, {"commands": cmds("A"), "on_complete": 42}),
        (ValidationError, {"commands": [BatchCommand("", uuid4(), {})]}),
        (ValidationError, {"commands": [BatchCommand("A", uuid4(), {"x": object()})]}),
        (ValidationError, {"commands": [{"command_type": "A"}]}),
        (ValidationError, {"commands": cmds("A"), "domain": "Bad-Domain"}),
    ]  # fmt: skip
    for error, kwargs in bad:
        domain = kwargs.pop("domain", "billing")
        with pytest.raises(error):
            await bus.create_batch(domain, **kwargs)
    with pytest.raises(ValueError, match="at least one command"):  # the predecessor's type
        await bus.create_batch("billing", [])
    assert await count_rows(pool) == (0, 0, 0)
    assert await fetch(pool, "SELECT queue_name FROM pgmq.meta") == []


async def test_failure_inside_the_sql_rolls_everything_back(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    taken = uuid4()
    await bus.send("billing", "A", taken, {})
    before = await count_rows(pool)
    fresh = BatchCommand("A", uuid4(), {})
    bid = uuid4()
    with pytest.raises(DuplicateCommandError) as info:
        await bus.create_batch("billing", [fresh, BatchCommand("B", taken, {})], batch_id=bid)
    assert info.value.command_id == str(taken)
    assert await count_rows(pool) == before  # no batch row, no command, no audit row
    assert await bus.get_batch("billing", bid) is None
    assert await bus.get_command("billing", fresh.command_id) is None
    assert await queue_depth(pool, "billing__commands") == 1  # the messages went too

    await bus.create_batch("billing", cmds("A"), batch_id=bid)
    before = await count_rows(pool)
    with pytest.raises(DuplicateBatchError) as dup:
        await bus.create_batch("billing", cmds("A", "B"), batch_id=bid)
    assert isinstance(dup.value, InvalidOperationError) and dup.value.batch_id == str(bid)
    assert await count_rows(pool) == before
    assert await queue_depth(pool, "billing__commands") == 2
    # The same batch_id in another domain is another batch.
    await bus.create_batch("other", cmds("A"), batch_id=bid)


async def test_create_batch_in_the_callers_transaction(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    async with pool.connection() as conn:
        async with conn.transaction(force_rollback=True):
            rolled = await bus.create_batch("billing", cmds("A", "B"), conn=conn)
        async with conn.transaction():
            kept = await bus.create_batch("billing", cmds("A"), conn=conn)
    assert await bus.get_batch("billing", rolled.batch_id) is None
    assert await bus.get_command("billing", rolled.command_results[0].command_id) is None
    assert await bus.get_batch("billing", kept.batch_id) is not None
    assert await queue_depth(pool, "billing__commands") == 1


async def test_get_list_and_list_batch_commands_filters(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    made = [await bus.create_batch("billing", cmds("A", "B", "C")) for _ in range(3)]
    await bus.create_batch("other", cmds("A"))
    ids = [m.batch_id for m in made]

    listed = await bus.list_batches("billing")
    assert [b.batch_id for b in listed] == ids[::-1]  # newest first
    assert [b.batch_id for b in await bus.list_batches("billing", limit=1, offset=1)] == [ids[1]]
    assert await bus.list_batches("billing", status=BatchStatus.COMPLETED) == []
    assert await bus.get_batch("billing", uuid4()) is None
    assert await bus.get_batch("other", ids[0]) is None

    worker = Worker(pool, "billing", retry_policy=FAST)
    try:
        [first] = await worker.receive()  # the oldest batch's first command
        await worker.complete(first)
    finally:
        await worker.close()
    in_progress = await bus.list_batches("billing", status=BatchStatus.IN_PROGRESS)
    assert [b.batch_id for b in in_progress] == [ids[0]]
    assert len(await bus.list_batches("billing", status=BatchStatus.PENDING)) == 2

    done = await bus.list_batch_commands("billing", ids[0], status=CommandStatus.COMPLETED)
    assert [c.command_id for c in done] == [first.command.command_id]
    pending = await bus.list_batch_commands("billing", ids[0], status=CommandStatus.PENDING)
    assert len(pending) == 2
    page = await bus.list_batch_commands("billing", ids[0], limit=2, offset=1)
    assert [c.command_id for c in page] == [c.command_id for c in pending]
    assert await bus.list_batch_commands("billing", uuid4()) == []
    for bad in ({"limit": -1}, {"offset": "x"}, {"status": "NOPE"}):
        with pytest.raises(ValidationError):
            await bus.list_batch_commands("billing", ids[0], **bad)
        with pytest.raises(ValidationError):
            await bus.list_batches("billing", **bad)

    repo = PostgresBatchRepository(pool)
    assert await repo.exists("billing", ids[0]) and not await repo.exists("other", ids[0])


async def test_repository_of_the_predecessor(pool: AsyncConnectionPool[Any]) -> None:
    """save/get/exists/list, and the TSQ and repair methods, which move counters through
    apply_batch_delta_v1 (completion, BATCH_COMPLETED and NOTIFY included)."""
    repo = PostgresBatchRepository(pool)
    saved = BatchMetadata(domain="billing", batch_id=uuid4(), name="n", custom_data={"k": [1]},
                          total_count=2)  # fmt: skip
    await repo.save(saved)
    got = await repo.get("billing", saved.batch_id)
    assert got is not None and (got.name, got.custom_data, got.total_count) == ("n", {"k": [1]}, 2)
    with pytest.raises(DuplicateBatchError):
        await repo.save(saved)
    assert [b.batch_id for b in await repo.list_batches("billing", status="PENDING")] == [
        saved.batch_id
    ]

    bus = CommandBus(pool)
    result = await bus.create_batch("billing", cmds("Ok", "Perm"))
    bid = result.batch_id
    worker = Worker(pool, "billing")
    try:
        [ok] = await worker.receive()
        await worker.complete(ok)
        [perm] = await worker.receive()
        await worker.fail_permanent(perm, PermanentCommandError("DECLINED", "no"))
    finally:
        await worker.close()
    S = BatchStatus
    assert counters(await repo.get("billing", bid)) == (S.IN_PROGRESS, 1, 0, 0, 1)
    # An operator completed the TSQ command (the predecessor's ops call this after the row).
    async with pool.connection() as conn:
        assert await repo.tsq_complete("billing", bid, conn=conn) is True
    assert counters(await repo.get("billing", bid)) == (S.COMPLETED, 2, 0, 0, 0)
    assert await batch_events(pool, bid) == ["BATCH_STARTED", "BATCH_COMPLETED"]

    # refresh_stats recounts from the command rows: here one COMPLETED, one in the TSQ.
    await fetch(pool, "UPDATE commandbus.batch SET completed_count = 0, in_troubleshooting_count"
                " = 0, status = 'IN_PROGRESS', completed_at = NULL WHERE batch_id = %s"
                " RETURNING 1", bid)  # fmt: skip
    refreshed = await repo.refresh_stats("billing", bid)
    assert counters(refreshed) == (S.IN_PROGRESS, 1, 0, 0, 1)
    await repo.tsq_retry("billing", bid)  # (the command did not move: repaired below)
    assert counters(await repo.get("billing", bid)) == (S.IN_PROGRESS, 1, 0, 0, 0)
    assert counters(await repo.refresh_stats("billing", bid)) == (S.IN_PROGRESS, 1, 0, 0, 1)
    assert await repo.tsq_cancel("billing", bid) is True
    assert counters(await repo.get("billing", bid)) == (S.COMPLETED_WITH_FAILURES, 1, 0, 1, 0)
    assert await repo.refresh_stats("billing", uuid4()) is None
    pending = await repo.refresh_stats("billing", saved.batch_id)  # no commands, no change
    assert pending is not None and pending.status == S.PENDING


async def test_counters_after_each_step_of_a_mixed_batch(pool: AsyncConnectionPool[Any]) -> None:
    """Successes, a retried transient failure, a TSQ move and a business-rule failure, one
    outcome at a time through a real Worker (its step API), counters checked after each."""
    bus = CommandBus(pool)
    result = await bus.create_batch("billing", cmds("Ok", "Flaky", "Perm", "Rule"))
    bid = result.batch_id
    worker = Worker(pool, "billing", retry_policy=FAST)
    S = BatchStatus

    async def state() -> tuple[Any, ...]:
        return counters(await bus.get_batch("billing", bid))

    try:
        assert await state() == (S.PENDING, 0, 0, 0, 0)
        [ok] = await worker.receive()
        assert ok.command.command_type == "Ok"
        assert await state() == (S.IN_PROGRESS, 0, 0, 0, 0)  # first receive starts the batch
        assert await batch_events(pool, bid) == ["BATCH_STARTED"]
        batch = await bus.get_batch("billing", bid)
        assert batch is not None and batch.started_at is not None
        await worker.complete(ok, {"ok": True})
        assert await state() == (S.IN_PROGRESS, 1, 0, 0, 0)

        [flaky] = await worker.receive()
        assert flaky.command.command_type == "Flaky"
        await worker.fail(flaky, TransientCommandError("TIMEOUT", "later"))  # retry: no count
        assert await state() == (S.IN_PROGRESS, 1, 0, 0, 0)
        # Visible again at once (backoff 0), behind the commands that were already waiting:
        # claims take messages in the order they became visible.
        [perm] = await worker.receive()
        assert perm.command.command_type == "Perm"
        await worker.fail_permanent(perm, PermanentCommandError("DECLINED", "no"))
        assert await state() == (S.IN_PROGRESS, 1, 0, 0, 1)
        [rule] = await worker.receive()
        assert rule.command.command_type == "Rule"
        await worker.fail_business_rule(rule, BusinessRuleException("CLOSED", "closed"))
        assert await state() == (S.IN_PROGRESS, 1, 1, 0, 1)
        [again] = await worker.receive()
        assert again.command.command_id == flaky.command.command_id
        assert again.context.attempt == 2
        await worker.complete(again)
        # Everything else is terminal, but one command waits in the TSQ: not complete.
        assert await state() == (S.IN_PROGRESS, 2, 1, 0, 1)
        assert await batch_events(pool, bid) == ["BATCH_STARTED"]
    finally:
        await worker.close()
    stuck = await bus.list_batch_commands(
        "billing", bid, status=CommandStatus.IN_TROUBLESHOOTING_QUEUE
    )
    assert [c.command_id for c in stuck] == [perm.command.command_id]


@pytest.mark.parametrize(
    ("types", "final", "done", "failed"),
    [(("Ok", "Ok", "Ok"), BatchStatus.COMPLETED, 3, 0),
     (("Ok", "Rule", "Ok"), BatchStatus.COMPLETED_WITH_FAILURES, 2, 1)],
)  # fmt: skip
async def test_batch_completes_with_audit_and_callback_once(
    pool: AsyncConnectionPool[Any],
    monkeypatch: pytest.MonkeyPatch,
    types: tuple[str, ...],
    final: BatchStatus,
    done: int,
    failed: int,
) -> None:
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 0.1)  # polls would re-fire
    registry = HandlerRegistry()

    @registry.handler("billing", "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        return {"i": cmd.data["i"]}

    @registry.handler("billing", "Rule")
    async def rule(cmd: Command, ctx: HandlerContext) -> None:
        raise BusinessRuleException("CLOSED", "account closed")

    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch)

    bus = CommandBus(pool)
    result = await bus.create_batch("billing", cmds(*types), on_complete=on_complete)
    bid = result.batch_id
    worker = Worker(pool, "billing", registry, retry_policy=FAST)
    task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
    try:
        await wait_until(lambda: _true(bool(fired)), timeout=10)
    finally:
        await worker.stop(timeout=5)
        await task
    await asyncio.sleep(0.5)  # several polls later: still once
    assert len(fired) == 1
    assert counters(fired[0]) == (final, done, failed, 0, 0)
    assert fired[0].completed_at is not None and fired[0].total_count == 3
    assert await batch_events(pool, bid) == ["BATCH_STARTED", "BATCH_COMPLETED"]
    [(details,)] = await fetch(
        pool, "SELECT details_json FROM commandbus.audit WHERE command_id = %s"
        " AND event_type = 'BATCH_COMPLETED'", bid,
    )  # fmt: skip
    assert details == {
        "batch_id": str(bid), "status": final.value, "total_count": 3,
        "completed_count": done, "failed_count": failed, "canceled_count": 0,
    }  # fmt: skip
    # The predecessor's explicit paths find nothing left to run.
    repo = PostgresBatchRepository(pool)
    await invoke_batch_callback("billing", bid, repo)
    await check_and_invoke_batch_callback("billing", bid, repo)
    assert len(fired) == 1 and get_batch_callback("billing", bid) is None


async def _true(value: bool) -> bool:
    return value


async def test_sync_and_failing_callbacks(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    threads: list[str] = []
    seen: list[UUID] = []

    def sync_callback(batch: BatchMetadata) -> None:
        threads.append(threading.current_thread().name)
        seen.append(batch.batch_id)

    def broken(batch: BatchMetadata) -> None:
        raise RuntimeError("callback bug")

    class AsyncCallable:
        async def __call__(self, batch: BatchMetadata) -> None:
            seen.append(batch.batch_id)

    first = await bus.create_batch("billing", cmds("A"), on_complete=broken)
    second = await bus.create_batch("billing", cmds("A"), on_complete=sync_callback)
    third = await bus.create_batch("billing", cmds("A"), on_complete=AsyncCallable())
    worker = Worker(pool, "billing")
    try:
        for _ in range(3):
            [received] = await worker.receive()
            await worker.complete(received)
    finally:
        await worker.close()
    await wait_until(lambda: _true(len(seen) == 2), timeout=10)
    assert sorted(seen) == sorted([second.batch_id, third.batch_id])
    assert threads and threads[0] != threading.main_thread().name
    assert get_batch_callback("billing", first.batch_id) is None  # ran (and raised) once


async def test_callback_registered_after_completion_fires_once(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    result = await bus.create_batch("billing", cmds("A"))
    worker = Worker(pool, "billing")
    try:
        [received] = await worker.receive()
        await worker.complete(received)
    finally:
        await worker.close()
    fired: list[BatchStatus] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch.status)

    # Announced before anyone listened: the checks at registration and after LISTEN find it.
    await register_batch_callback("billing", result.batch_id, on_complete, pool=pool)
    await wait_until(lambda: _true(bool(fired)), timeout=10)
    await asyncio.sleep(0.3)
    assert fired == [BatchStatus.COMPLETED]


async def test_poll_finds_a_completion_that_was_not_announced(
    pool: AsyncConnectionPool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 0.2)
    bus = CommandBus(pool)
    fired: list[UUID] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch.batch_id)

    result = await bus.create_batch("billing", cmds("A"), on_complete=on_complete)
    listener = batch_mod._listeners[pool.conninfo]
    await asyncio.wait_for(listener.listening.wait(), 10)
    await fetch(  # completed behind the listener's back: no NOTIFY
        pool, "UPDATE commandbus.batch SET status = 'COMPLETED' WHERE batch_id = %s"
        " RETURNING batch_id", result.batch_id,
    )  # fmt: skip
    await wait_until(lambda: _true(bool(fired)), timeout=10)
    assert fired == [result.batch_id]
    await wait_until(lambda: _true(not listener.alive), timeout=10)  # idle: it stopped


async def test_listener_reconnects_and_catches_up(
    pool: AsyncConnectionPool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 3600.0)  # no poll to help
    monkeypatch.setattr(batch_mod, "LISTENER_RECONNECT_DELAY", (0.3, 1.0))
    bus = CommandBus(pool)
    fired: list[UUID] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch.batch_id)

    result = await bus.create_batch("billing", cmds("A"), on_complete=on_complete)
    listener = batch_mod._listeners[pool.conninfo]
    await asyncio.wait_for(listener.listening.wait(), 10)
    await fetch(
        pool, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND datname = current_database()",
        batch_mod.LISTENER_APPLICATION_NAME,
    )  # fmt: skip
    # Completed while the listener may be away, by an operator action (the step API would run
    # the callback itself: tests/integration/test_batch_rule.py).
    worker = Worker(pool, "billing")
    try:
        [received] = await worker.receive()
        await worker.fail_permanent(received, PermanentCommandError("DOWN", "needs an operator"))
    finally:
        await worker.close()
    await TroubleshootingQueue(pool).operator_complete("billing", received.command.command_id)
    await wait_until(lambda: _true(bool(fired)), timeout=15)
    assert fired == [result.batch_id] and listener.connections >= 2


async def test_close_drops_pending_callbacks_and_stops_the_listener(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus, other = CommandBus(pool), CommandBus(pool)

    async def never(batch: BatchMetadata) -> None:
        raise AssertionError("dropped callbacks must not run")

    mine = await bus.create_batch("billing", cmds("A"), on_complete=never)
    theirs = await other.create_batch("billing", cmds("A"), on_complete=never)
    listener = batch_mod._listeners[pool.conninfo]
    await asyncio.wait_for(listener.listening.wait(), 10)
    await bus._close_batch_listener()  # what CommandBus.close() calls
    assert get_batch_callback("billing", mine.batch_id) is None
    assert listener.alive  # the other bus still waits for its batch
    await other._close_batch_listener()
    assert get_batch_callback("billing", theirs.batch_id) is None and not listener.alive

    async def listener_gone() -> bool:
        # The server ends a backend shortly after its client disconnects: wait for it, in this
        # test's database only (the server may be shared with other runs).
        rows = await fetch(
            pool,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            batch_mod.LISTENER_APPLICATION_NAME,
        )
        return rows == [(0,)]

    await wait_until(listener_gone, timeout=10)


@pytest.mark.timeout(60)
async def test_last_command_finished_in_another_process(
    pool: AsyncConnectionPool[Any], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 3600.0)  # NOTIFY must do it
    bus = CommandBus(pool)
    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch)

    result = await bus.create_batch("billing", cmds("Finish", "Finish", "Finish"),
                                    on_complete=on_complete)  # fmt: skip
    await asyncio.wait_for(batch_mod._listeners[pool.conninfo].listening.wait(), 10)
    worker = Worker(pool, "billing")
    try:
        for _ in range(2):
            [received] = await worker.receive()
            await worker.complete(received)
    finally:
        await worker.close()
    assert counters(await bus.get_batch("billing", result.batch_id))[1] == 2 and not fired

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FINISHER), database_url, "billing", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    pid = int(out.decode().split()[1])
    await wait_until(lambda: _true(bool(fired)), timeout=10)
    await asyncio.sleep(0.3)
    assert len(fired) == 1 and fired[0].status == BatchStatus.COMPLETED
    assert fired[0].completed_count == 3
    last = result.command_results[2].command_id
    meta = await bus.get_command("billing", last)
    assert meta is not None and meta.result == {"pid": pid}  # finished by the other process
