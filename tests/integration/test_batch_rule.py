"""The batch rule: a command in the TSQ is not finished, so a batch completes (and on_complete
runs) only once every command is COMPLETED, FAILED or CANCELED; a batch whose remaining
commands all wait in the TSQ is visible as `waiting_for_operator`. The step API runs the
callback this process registered before `complete()` / `fail*()` returns, once overall, also
with a second pool and with another process finishing the batch. Operator retry clears the
command's last error (its history stays in the audit trail)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import pytest_asyncio
from itest_helpers import events, fetch, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BatchCommand,
    BatchMetadata,
    BatchStatus,
    BusinessRuleException,
    CommandBus,
    PermanentCommandError,
    RetryPolicy,
    TransientCommandError,
    ValidationError,
    Worker,
)
from commandbus import batch as batch_mod
from commandbus.ops import TroubleshootingQueue
from commandbus.repositories.batch import PostgresBatchRepository
from commandbus.worker import ReceivedCommand

Pool = AsyncConnectionPool[Any]
FAST = RetryPolicy(max_attempts=2, backoff_schedule=[0])
STEP_FINISHER = Path(__file__).resolve().parents[1] / "e2e" / "batch_step_finisher.py"


@pytest_asyncio.fixture(autouse=True)
async def _clean_registry() -> AsyncIterator[None]:
    yield
    batch_mod.clear_all_callbacks()
    for listener in list(batch_mod._listeners.values()):
        await listener.stop()


def cmds(n: int, command_type: str = "Pay") -> list[BatchCommand]:
    return [BatchCommand(command_type, uuid4(), {"i": i}) for i in range(n)]


async def receive_all(worker: Worker, n: int) -> dict[UUID, ReceivedCommand]:
    claimed: dict[UUID, ReceivedCommand] = {}
    while len(claimed) < n:
        got = await worker.receive(batch_size=n)
        assert got
        claimed.update((r.command.command_id, r) for r in got)
    return claimed


async def _true(value: bool) -> bool:
    return value


async def batch_completed_events(pool: Pool, batch_id: UUID) -> int:
    [(n,)] = await fetch(
        pool,
        "SELECT count(*) FROM commandbus.audit WHERE command_id = %s"
        " AND event_type = 'BATCH_COMPLETED'",
        batch_id,
    )
    return int(n)


# -- the rule and waiting_for_operator -------------------------------------------------------


async def test_tsq_commands_keep_a_batch_open_until_an_operator_acts(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 0.1)
    bus = CommandBus(pool)
    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch)

    waiting = await bus.create_batch("billing", cmds(4), name="waits", on_complete=on_complete)
    other = await bus.create_batch("billing", cmds(2), name="still working")
    done = await bus.create_batch("billing", cmds(1), name="done")
    bid = waiting.batch_id
    ids = [r.command_id for r in waiting.command_results]
    worker = Worker(pool, "billing", retry_policy=FAST)
    try:
        claimed = await receive_all(worker, 7)
        await worker.complete(claimed[ids[0]])
        await worker.fail_business_rule(claimed[ids[1]], BusinessRuleException("CLOSED", "no"))
        await worker.fail_permanent(claimed[ids[2]], PermanentCommandError("DECLINED", "no"))
        batch = await bus.get_batch("billing", bid)
        assert batch is not None and not batch.waiting_for_operator  # one still in flight
        # the last one exhausts its retries: every remaining command now waits in the TSQ
        last = claimed[ids[3]]
        await worker.fail(last, TransientCommandError("TIMEOUT", "slow"))
        [last] = await worker.receive()
        await worker.fail(last, TransientCommandError("TIMEOUT", "slow"))
        [other_1, _other_2] = [claimed[r.command_id] for r in other.command_results]
        await worker.fail_permanent(other_1, PermanentCommandError("DECLINED", "no"))
        await worker.complete(claimed[done.command_results[0].command_id])
    finally:
        await worker.close()

    batch = await bus.get_batch("billing", bid)
    assert batch is not None
    assert (batch.status, batch.completed_count, batch.failed_count, batch.canceled_count,
            batch.in_troubleshooting_count) == (BatchStatus.IN_PROGRESS, 1, 1, 0, 2)  # fmt: skip
    assert batch.waiting_for_operator and batch.completed_at is None
    await asyncio.sleep(0.5)  # polls and notifications: nothing completed, nothing fired
    assert fired == []

    listed = await bus.list_batches("billing", waiting_for_operator=True)
    assert [b.batch_id for b in listed] == [bid]
    assert listed[0].waiting_for_operator
    not_waiting = await bus.list_batches("billing", waiting_for_operator=False)
    assert [b.batch_id for b in not_waiting] == [done.batch_id, other.batch_id]
    assert not any(b.waiting_for_operator for b in not_waiting)
    assert len(await bus.list_batches("billing")) == 3
    both = await bus.list_batches(
        "billing", status=BatchStatus.IN_PROGRESS, waiting_for_operator=True
    )
    assert [b.batch_id for b in both] == [bid]
    assert (
        await bus.list_batches("billing", status=BatchStatus.COMPLETED, waiting_for_operator=True)
        == []
    )
    repo = PostgresBatchRepository(pool)
    assert [b.batch_id for b in await repo.list_batches("billing", waiting_for_operator=True)] == [
        bid
    ]
    with pytest.raises(ValidationError):
        await bus.list_batches("billing", waiting_for_operator="yes")  # type: ignore[arg-type]

    tsq = TroubleshootingQueue(pool)
    await tsq.operator_complete("billing", ids[2], {"manual": True}, operator="alice")
    still = await bus.get_batch("billing", bid)
    assert still is not None and still.waiting_for_operator and still.status == "IN_PROGRESS"
    assert fired == []
    await tsq.operator_cancel("billing", ids[3], "gave up", operator="bob")
    final = await bus.get_batch("billing", bid)
    assert final is not None and final.status == BatchStatus.COMPLETED_WITH_FAILURES
    assert not final.waiting_for_operator
    assert await bus.list_batches("billing", waiting_for_operator=True) == []
    await wait_until(lambda: _true(bool(fired)), timeout=10)
    await asyncio.sleep(0.3)
    assert len(fired) == 1 and fired[0].canceled_count == 1
    await bus.close()


async def test_operator_retry_takes_a_batch_out_of_waiting(pool: Pool) -> None:
    bus = CommandBus(pool)
    result = await bus.create_batch("billing", cmds(1))
    [cid] = [r.command_id for r in result.command_results]
    worker = Worker(pool, "billing")
    try:
        [received] = await worker.receive()
        await worker.fail_permanent(received, PermanentCommandError("DECLINED", "no"))
        batch = await bus.get_batch("billing", result.batch_id)
        assert batch is not None and batch.waiting_for_operator
        await TroubleshootingQueue(pool).operator_retry("billing", cid)
        batch = await bus.get_batch("billing", result.batch_id)
        assert batch is not None and not batch.waiting_for_operator
        assert batch.status == BatchStatus.IN_PROGRESS
        assert await bus.list_batches("billing", waiting_for_operator=True) == []
    finally:
        await worker.close()
        await bus.close()


# -- the step API runs the callback before it returns ----------------------------------------


@pytest.mark.parametrize("last_step", ["complete", "fail_business_rule"])
async def test_step_api_runs_the_callback_before_returning_and_once(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, last_step: str
) -> None:
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 0.1)  # polls would re-fire
    bus = CommandBus(pool)
    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        await asyncio.sleep(0.05)  # an awaited callback, not one merely started
        fired.append(batch)

    result = await bus.create_batch("billing", cmds(2), on_complete=on_complete)
    await asyncio.wait_for(batch_mod._listeners[pool.conninfo].listening.wait(), 10)
    worker = Worker(pool, "billing")
    try:
        [first] = await worker.receive()
        await worker.complete(first)
        assert fired == []
        [last] = await worker.receive()
        if last_step == "complete":
            await worker.complete(last, {"ok": True})
        else:
            await worker.fail_business_rule(last, BusinessRuleException("CLOSED", "closed"))
        assert len(fired) == 1  # already ran, before the call returned
    finally:
        await worker.close()
    expected = BatchStatus.COMPLETED if last_step == "complete" else "COMPLETED_WITH_FAILURES"
    assert fired[0].status == expected and fired[0].completed_at is not None
    await asyncio.sleep(0.5)  # the NOTIFY and several polls later: still once
    assert len(fired) == 1
    assert batch_mod.get_batch_callback("billing", result.batch_id) is None
    assert await batch_completed_events(pool, result.batch_id) == 1
    await bus.close()


async def test_step_api_on_a_second_pool_and_bus_runs_it_once(
    pool: Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callback registered by one bus (and its pool) runs when a worker on another pool of
    the same database finishes the batch, before that call returns, and once; a second bus's
    own batch keeps its own callback."""
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 0.1)
    fired: list[tuple[str, UUID]] = []

    def callback(tag: str) -> Any:
        async def on_complete(batch: BatchMetadata) -> None:
            fired.append((tag, batch.batch_id))

        return on_complete

    other_pool: Pool = AsyncConnectionPool(database_url, min_size=1, max_size=2, open=False)
    await other_pool.open(wait=True)
    bus_a, bus_b = CommandBus(pool), CommandBus(other_pool)
    try:
        a = await bus_a.create_batch("billing", cmds(1), on_complete=callback("a"))
        b = await bus_b.create_batch("billing", cmds(1), on_complete=callback("b"))
        worker = Worker(other_pool, "billing")
        try:
            claimed = await receive_all(worker, 2)
            await worker.complete(claimed[a.command_results[0].command_id])
            assert fired == [("a", a.batch_id)]
            await worker.complete(claimed[b.command_results[0].command_id])
            assert fired == [("a", a.batch_id), ("b", b.batch_id)]
        finally:
            await worker.close()
        await asyncio.sleep(0.5)
        assert fired == [("a", a.batch_id), ("b", b.batch_id)]
    finally:
        await bus_a.close()
        await bus_b.close()
        await other_pool.close()


async def test_step_api_without_a_callback_or_batch_looks_nothing_up(pool: Pool) -> None:
    bus = CommandBus(pool)
    result = await bus.create_batch("billing", cmds(1))
    await bus.send("billing", "Pay", uuid4(), {"plain": True})
    worker = Worker(pool, "billing")
    try:
        claimed = await receive_all(worker, 2)
        for received in claimed.values():
            await worker.complete(received)
    finally:
        await worker.close()
        await bus.close()
    batch = await bus.get_batch("billing", result.batch_id)
    assert batch is not None and batch.status == BatchStatus.COMPLETED


async def test_step_api_runs_a_callback_registered_without_a_pool(pool: Pool) -> None:
    """The predecessor's `register_batch_callback(domain, batch_id, cb)`: no listener, the step
    API that finishes the batch runs it."""
    bus = CommandBus(pool)
    result = await bus.create_batch("billing", cmds(1))
    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch)

    await batch_mod.register_batch_callback("billing", result.batch_id, on_complete)
    assert batch_mod._listeners == {}
    worker = Worker(pool, "billing")
    try:
        [received] = await worker.receive()
        await worker.complete(received)
        assert len(fired) == 1 and fired[0].status == BatchStatus.COMPLETED
    finally:
        await worker.close()
        await bus.close()


async def test_step_api_waits_for_the_run_the_listener_started(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener hears the completion before the step API looks: the step API does not run
    the callback again, it waits until the listener's run has finished."""
    bus = CommandBus(pool)
    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        await asyncio.sleep(0.2)
        fired.append(batch)

    result = await bus.create_batch("billing", cmds(1), on_complete=on_complete)
    await asyncio.wait_for(batch_mod._listeners[pool.conninfo].listening.wait(), 10)
    key = ("billing", result.batch_id)
    real_fetch_one = batch_mod._db.fetch_one

    async def slow_fetch_one(*args: Any, **kwargs: Any) -> Any:
        if args[1] == "batch_get":  # the step API's lookup: let the listener win
            await wait_until(lambda: _true(key in batch_mod._running), timeout=10)
        return await real_fetch_one(*args, **kwargs)

    monkeypatch.setattr(batch_mod._db, "fetch_one", slow_fetch_one)
    worker = Worker(pool, "billing")
    try:
        [received] = await worker.receive()
        await worker.complete(received)
        assert len(fired) == 1  # the listener's run, finished before complete() returned
    finally:
        await worker.close()
    await asyncio.sleep(0.3)
    assert len(fired) == 1 and key not in batch_mod._running
    await bus.close()


@pytest.mark.timeout(60)
async def test_step_api_in_another_process_finishes_the_batch(
    pool: Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process registered on_complete; another process registered its own callback for
    the same batch and finishes the last command with the step API. Its callback has run when
    its complete() returns, ours runs through NOTIFY; each exactly once."""
    monkeypatch.setattr(batch_mod, "LISTENER_POLL_INTERVAL", 3600.0)  # NOTIFY must do it
    bus = CommandBus(pool)
    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch)

    result = await bus.create_batch("billing", cmds(2), on_complete=on_complete)
    await asyncio.wait_for(batch_mod._listeners[pool.conninfo].listening.wait(), 10)
    worker = Worker(pool, "billing")
    try:
        [first] = await worker.receive()
        await worker.complete(first)
    finally:
        await worker.close()
    assert fired == []

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(STEP_FINISHER), database_url, "billing", str(result.batch_id), "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    _, pid, at_return, later = out.decode().split()
    assert (at_return, later) == ("1", "1")
    await wait_until(lambda: _true(bool(fired)), timeout=10)
    await asyncio.sleep(0.3)
    assert len(fired) == 1 and fired[0].status == BatchStatus.COMPLETED
    last = await bus.get_command("billing", result.command_results[1].command_id)
    assert last is not None and last.result == {"pid": int(pid)}
    assert await batch_completed_events(pool, result.batch_id) == 1
    await bus.close()


# -- operator retry clears the last error -----------------------------------------------------


async def error_columns(pool: Pool, cid: UUID) -> tuple[Any, ...]:
    [row] = await fetch(
        pool,
        "SELECT status, last_error_type, last_error_code, last_error_msg FROM commandbus.command"
        " WHERE command_id = %s",
        cid,
    )
    return row


async def test_operator_retry_and_retry_all_clear_the_last_error(pool: Pool) -> None:
    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(3)]
    for cid in ids:
        await bus.send("orders", "Charge", cid, {"n": 1})
    await bus.close()
    worker = Worker(pool, "orders")
    try:
        claimed = await receive_all(worker, 3)
        for cid in ids:
            await worker.fail_permanent(claimed[cid], PermanentCommandError("DECLINED", "card"))
    finally:
        await worker.close()
    assert await error_columns(pool, ids[0]) == (
        "IN_TROUBLESHOOTING_QUEUE", "PERMANENT", "DECLINED", "card",
    )  # fmt: skip

    tsq = TroubleshootingQueue(pool)
    await tsq.operator_retry("orders", ids[0], operator="alice")
    assert await error_columns(pool, ids[0]) == ("PENDING", None, None, None)
    meta = await CommandBus(pool).get_command("orders", ids[0])
    assert meta is not None
    assert (meta.last_error_type, meta.last_error_code, meta.last_error_msg) == (None,) * 3
    # the others are untouched until the bulk retry
    assert (await error_columns(pool, ids[1]))[2] == "DECLINED"
    assert await tsq.retry_all("orders", operator="bob", chunk_size=1) == 2
    for cid in ids:
        assert await error_columns(pool, cid) == ("PENDING", None, None, None)
        # the error history stays in the audit trail
        assert await events(pool, cid) == ["SENT", "RECEIVED", "MOVED_TO_TSQ", "OPERATOR_RETRY"]
        [(details,)] = await fetch(
            pool,
            "SELECT details_json FROM commandbus.audit WHERE command_id = %s"
            " AND event_type = 'MOVED_TO_TSQ'",
            cid,
        )
        assert (details["error_type"], details["error_code"], details["error_msg"]) == (
            "PERMANENT", "DECLINED", "card",
        )  # fmt: skip


# -- the seed README's batch examples, as written there ----------------------------------------


async def process_monthly_billing(bus: CommandBus, accounts: list[dict]) -> UUID:  # type: ignore[type-arg]
    """Create a batch of billing commands with completion callback."""

    # Define callback for when batch completes
    async def on_batch_complete(batch: BatchMetadata) -> None:
        print(f"Batch {batch.batch_id} finished:")
        print(f"  - Completed: {batch.completed_count}/{batch.total_count}")
        print(f"  - Failed: {batch.in_troubleshooting_count}")
        print(f"  - Status: {batch.status.value}")

    # Create batch with commands
    result = await bus.create_batch(
        domain="billing",
        commands=[
            BatchCommand(
                command_type="ProcessPayment",
                command_id=uuid4(),
                data={"account_id": acc["id"], "amount": acc["balance"]},
            )
            for acc in accounts
        ],
        name="Monthly billing - January 2026",
        on_complete=on_batch_complete,  # Called when all commands finish
    )

    print(f"Created batch {result.batch_id} with {result.total_commands} commands")
    return result.batch_id


async def monitor_batch(bus: CommandBus, batch_id: UUID) -> None:
    """Poll batch status for progress monitoring."""
    batch = await bus.get_batch("billing", batch_id)
    if batch:
        progress = (batch.completed_count + batch.in_troubleshooting_count) / batch.total_count
        print(f"Batch progress: {progress:.1%}")
        print(f"  Status: {batch.status.value}")
        print(f"  Completed: {batch.completed_count}")
        print(f"  In TSQ: {batch.in_troubleshooting_count}")


async def test_seed_batch_examples_and_the_rule(
    pool: Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The seed's examples run as written. With one payment in the TSQ its monitor shows 100%,
    but the batch is not finished: no "finished" line until an operator acts on it."""
    bus = CommandBus(pool)
    batch_id = await process_monthly_billing(
        bus, [{"id": "a1", "balance": 10}, {"id": "a2", "balance": 20}]
    )
    worker = Worker(pool, "billing")
    try:
        claimed = await receive_all(worker, 2)
        first, second = sorted(claimed.values(), key=lambda r: r.command.data["account_id"])
        await worker.complete(first, {"paid": True})
        await worker.fail_permanent(second, PermanentCommandError("DECLINED", "card declined"))
    finally:
        await worker.close()
    await monitor_batch(bus, batch_id)
    out = capsys.readouterr().out
    assert "Batch progress: 100.0%" in out and "Status: IN_PROGRESS" in out
    assert "finished" not in out
    batch = await bus.get_batch("billing", batch_id)
    assert batch is not None and batch.waiting_for_operator

    await TroubleshootingQueue(pool).operator_cancel(
        "billing", second.command.command_id, "declined", operator="ops"
    )
    seen: list[str] = []

    async def finished() -> bool:
        seen.append(capsys.readouterr().out)
        return "finished" in "".join(seen)

    await wait_until(finished, timeout=10)
    assert "Status: COMPLETED_WITH_FAILURES" in "".join(seen)
    await bus.close()
