"""The troubleshooting queue: listing, operator retry / cancel / complete, bulk actions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import pytest
from itest_helpers import events, fetch, queue_depth, status_of, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    Command,
    CommandBus,
    CommandNotFoundError,
    HandlerContext,
    HandlerRegistry,
    InvalidOperationError,
    PermanentCommandError,
    RetryPolicy,
    Worker,
)
from commandbus.exceptions import InvalidNameError, ValidationError
from commandbus.ops import TroubleshootingQueue
from commandbus.worker import ReceivedCommand

FAST = RetryPolicy(max_attempts=3, backoff_schedule=[0])
Pool = AsyncConnectionPool[Any]


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
    try:
        yield
    finally:
        await worker.stop(timeout=5)
        await task


async def wait_status(pool: Pool, domain: str, cid: UUID, status: str) -> None:
    async def check() -> bool:
        return await status_of(pool, domain, cid) == status

    await wait_until(check)


async def new_batch(pool: Pool, domain: str, total: int) -> UUID:
    batch_id = uuid4()
    async with pool.connection() as conn:
        await conn.execute(
            # total_count grows with every command sent into the batch
            "INSERT INTO commandbus.batch (domain, batch_id, total_count) VALUES (%s, %s, 0)",
            (domain, batch_id),
        )
    return batch_id


async def batch_row(pool: Pool, domain: str, batch_id: UUID) -> tuple[Any, ...]:
    [row] = await fetch(
        pool,
        "SELECT status, completed_count, failed_count, canceled_count, in_troubleshooting_count"
        " FROM commandbus.batch WHERE domain = %s AND batch_id = %s",
        domain,
        batch_id,
    )
    return row


async def audit_details(pool: Pool, cid: UUID, event: str) -> dict[str, Any]:
    [(details,)] = await fetch(
        pool,
        "SELECT details_json FROM commandbus.audit WHERE command_id = %s AND event_type = %s",
        cid,
        event,
    )
    return dict(details)


async def read_replies(pool: Pool, queue: str) -> list[dict[str, Any]]:
    rows = await fetch(pool, "SELECT message FROM pgmq.read(%s, 30, 10)", queue)
    return [r[0] for r in rows]


async def to_tsq(
    pool: Pool,
    domain: str,
    command_type: str = "Charge",
    n: int = 1,
    **send: Any,
) -> list[UUID]:
    """Send `n` commands and move them to the TSQ through the step API (fail_permanent)."""
    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(n)]
    try:
        for i, cid in enumerate(ids):
            await bus.send(domain, command_type, cid, {"n": i}, **send)
    finally:
        await bus.close()
    worker = Worker(pool, domain)
    try:
        claimed: dict[UUID, ReceivedCommand] = {}
        while len(claimed) < n:
            received = await worker.receive(batch_size=n)
            assert received
            claimed.update((r.command.command_id, r) for r in received)
        for cid in ids:  # in send order: the TSQ lists the last failed first
            error = PermanentCommandError("DECLINED", "card declined")
            await worker.fail_permanent(claimed[cid], error)
    finally:
        await worker.close()
    return ids


async def test_list_count_domains_and_lookup(pool: Pool) -> None:
    tsq = TroubleshootingQueue(pool)
    assert await tsq.list_domains() == []
    charges = await to_tsq(pool, "orders", "Charge", 3, reply_to="orders__replies")
    [refund] = await to_tsq(pool, "orders", "Refund")
    [invoice] = await to_tsq(pool, "billing", "Invoice")
    bus = CommandBus(pool)
    pending = uuid4()
    await bus.send("orders", "Charge", pending, {})
    await bus.close()

    items = await tsq.list_troubleshooting("orders")
    assert [i.command_id for i in items] == [refund, *reversed(charges)]  # last failed first
    item = next(i for i in items if i.command_id == charges[1])
    assert (item.domain, item.command_type, item.attempts, item.max_attempts) == (
        "orders", "Charge", 1, 3)  # fmt: skip
    assert (item.last_error_type, item.last_error_code, item.last_error_msg) == (
        "PERMANENT", "DECLINED", "card declined")  # fmt: skip
    assert item.reply_to == "orders__replies" and item.correlation_id is not None
    assert item.payload == {
        "domain": "orders", "command_type": "Charge", "command_id": str(charges[1]),
        "correlation_id": str(item.correlation_id), "reply_to": "orders__replies",
        "data": {"n": 1},
    }  # fmt: skip
    assert next(i for i in items if i.command_id == refund).reply_to is None

    assert [i.command_id for i in await tsq.list_troubleshooting("orders", "Refund")] == [refund]
    page = await tsq.list_troubleshooting("orders", limit=2, offset=1)
    assert [i.command_id for i in page] == [charges[2], charges[1]]
    assert await tsq.count_troubleshooting("orders") == 4
    assert await tsq.count_troubleshooting("orders", command_type="Charge") == 3
    assert await tsq.count_troubleshooting("shipping") == 0
    assert await tsq.list_domains() == ["billing", "orders"]

    assert await tsq.get_command_domain(invoice) == "billing"
    assert await tsq.get_command_domain(pending) == "orders"
    with pytest.raises(CommandNotFoundError):
        await tsq.get_command_domain(uuid4())

    everything, total, ids = await tsq.list_all_troubleshooting()
    assert [i.command_id for i in everything] == [invoice, refund, *reversed(charges)]
    assert total == 5 and set(ids) == {*charges, refund, invoice}
    page_items, total, _ = await tsq.list_all_troubleshooting(limit=2, offset=1)
    assert [i.command_id for i in page_items] == [refund, charges[2]] and total == 5
    billing, total, ids = await tsq.list_all_troubleshooting(domain="billing")
    assert [i.command_id for i in billing] == [invoice] and total == 1 and ids == [invoice]
    assert billing[0].payload is not None and billing[0].payload["data"] == {"n": 0}

    with pytest.raises(InvalidNameError):
        await tsq.list_troubleshooting("Bad-Domain")
    with pytest.raises(ValidationError):
        await tsq.list_troubleshooting("orders", limit=-1)


async def test_retry_makes_the_command_workable_again(pool: Pool) -> None:
    registry = HandlerRegistry()
    fail = {"on": True}

    @registry.handler("orders", "Charge")
    async def charge(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        if fail["on"]:
            raise PermanentCommandError("DECLINED", "card declined")
        return {"charged": cmd.data["amount"], "attempt": ctx.attempt}

    batch_id = await new_batch(pool, "orders", 1)
    bus = CommandBus(pool)
    cid = uuid4()
    sent = await bus.send("orders", "Charge", cid, {"amount": 5}, batch_id=batch_id)
    await bus.close()
    async with running(Worker(pool, "orders", registry, retry_policy=FAST)):
        await wait_status(pool, "orders", cid, "IN_TROUBLESHOOTING_QUEUE")
    assert await batch_row(pool, "orders", batch_id) == ("IN_PROGRESS", 0, 0, 0, 1)

    tsq = TroubleshootingQueue(pool)
    [archived] = await tsq.list_troubleshooting("orders")
    new_msg_id = await tsq.operator_retry("orders", cid, operator="alice")
    assert new_msg_id != sent.msg_id
    [row] = await fetch(
        pool,
        "SELECT status, attempts, msg_id, last_error_code FROM commandbus.command"
        " WHERE command_id = %s",
        cid,
    )
    assert row == ("PENDING", 0, new_msg_id, None)  # the last error is cleared, as before
    assert await audit_details(pool, cid, "OPERATOR_RETRY") == {
        "operator": "alice",
        "new_msg_id": new_msg_id,
    }
    assert await batch_row(pool, "orders", batch_id) == ("IN_PROGRESS", 0, 0, 0, 0)
    [(msg_id, message)] = await fetch(
        pool, "SELECT msg_id, message FROM pgmq.q_orders__commands"
    )  # test-only table name
    assert msg_id == new_msg_id and message == archived.payload
    assert await tsq.count_troubleshooting("orders") == 0

    fail["on"] = False
    async with running(Worker(pool, "orders", registry, retry_policy=FAST)):
        await wait_status(pool, "orders", cid, "COMPLETED")
    meta = await CommandBus(pool).get_command("orders", cid)
    assert meta is not None and meta.result == {"charged": 5, "attempt": 1}
    assert await events(pool, cid) == [
        "SENT", "RECEIVED", "MOVED_TO_TSQ", "OPERATOR_RETRY", "RECEIVED", "COMPLETED",
    ]  # fmt: skip
    assert await batch_row(pool, "orders", batch_id) == ("COMPLETED", 1, 0, 0, 0)


async def test_operator_cancel_replies_audits_and_counts(pool: Pool) -> None:
    batch_id = await new_batch(pool, "orders", 2)
    corr = uuid4()
    [cid] = await to_tsq(
        pool, "orders", reply_to="orders__replies", batch_id=batch_id, correlation_id=corr
    )
    [other] = await to_tsq(pool, "orders", batch_id=batch_id)
    tsq = TroubleshootingQueue(pool)

    await tsq.operator_cancel("orders", cid, "customer asked", operator="bob")
    assert await status_of(pool, "orders", cid) == "CANCELED"
    assert await audit_details(pool, cid, "OPERATOR_CANCEL") == {
        "operator": "bob", "reason": "customer asked", "reply_to": "orders__replies",
    }  # fmt: skip
    assert await read_replies(pool, "orders__replies") == [
        {"command_id": str(cid), "correlation_id": str(corr), "outcome": "CANCELED",
         "reason": "customer asked"},
    ]  # fmt: skip
    assert await batch_row(pool, "orders", batch_id) == ("IN_PROGRESS", 0, 0, 1, 1)

    # No reply queue: no reply; the last TSQ item completes the batch.
    await tsq.operator_cancel("orders", other, "duplicate")
    assert (await audit_details(pool, other, "OPERATOR_CANCEL"))["operator"] is None
    assert await batch_row(pool, "orders", batch_id) == ("COMPLETED_WITH_FAILURES", 0, 0, 2, 0)
    assert "BATCH_COMPLETED" in await events(pool, batch_id)
    assert await tsq.count_troubleshooting("orders") == 0


async def test_operator_complete_stores_result_and_replies(pool: Pool) -> None:
    batch_id = await new_batch(pool, "orders", 1)
    corr = uuid4()
    [cid] = await to_tsq(
        pool, "orders", reply_to="orders__replies", batch_id=batch_id, correlation_id=corr
    )
    tsq = TroubleshootingQueue(pool)

    await tsq.operator_complete("orders", cid, {"manual": True}, operator="carol")
    meta = await CommandBus(pool).get_command("orders", cid)
    assert meta is not None and meta.status == "COMPLETED" and meta.result == {"manual": True}
    assert await audit_details(pool, cid, "OPERATOR_COMPLETE") == {
        "operator": "carol", "has_result_data": True, "reply_to": "orders__replies",
    }  # fmt: skip
    assert await read_replies(pool, "orders__replies") == [
        {"command_id": str(cid), "correlation_id": str(corr), "outcome": "SUCCESS",
         "result": {"manual": True}},
    ]  # fmt: skip
    assert await batch_row(pool, "orders", batch_id) == ("COMPLETED", 1, 0, 0, 0)

    [bare] = await to_tsq(pool, "orders", reply_to="orders__replies")
    await tsq.operator_complete("orders", bare)
    assert (await audit_details(pool, bare, "OPERATOR_COMPLETE"))["has_result_data"] is False
    [reply] = await read_replies(pool, "orders__replies")
    assert reply["outcome"] == "SUCCESS" and reply["result"] is None
    with pytest.raises(ValidationError):
        await tsq.operator_complete("orders", uuid4(), {"bad": object()})


async def test_two_operators_at_once_exactly_one_wins(pool: Pool) -> None:
    tsq = TroubleshootingQueue(pool)
    ids = await to_tsq(pool, "orders", n=4, reply_to="orders__replies")

    def act(name: str, cid: UUID, operator: str) -> Coroutine[Any, Any, object]:
        if name == "cancel":
            return tsq.operator_cancel("orders", cid, "race", operator=operator)
        if name == "complete":
            return tsq.operator_complete("orders", cid, operator=operator)
        return tsq.operator_retry("orders", cid, operator=operator)

    pairs = [
        ("complete", "cancel"),
        ("cancel", "cancel"),
        ("retry", "retry"),
        ("retry", "complete"),
    ]
    for cid, (first, second) in zip(ids, pairs, strict=True):
        # Hold the row lock so that both actions are waiting on it when it is released.
        async with pool.connection() as conn:
            await conn.execute(
                "SELECT 1 FROM commandbus.command WHERE command_id = %s FOR UPDATE", (cid,)
            )
            racing = asyncio.gather(
                act(first, cid, "ann"), act(second, cid, "ben"), return_exceptions=True
            )
            await asyncio.sleep(0.2)
            assert not racing.done()
        outcomes = await racing
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], InvalidOperationError), outcomes
        assert "not in troubleshooting queue" in str(errors[0])
        operator_events = [e for e in await events(pool, cid) if e.startswith("OPERATOR_")]
        assert len(operator_events) == 1
    # One reply per command that was canceled or completed, a queue message per retried one.
    statuses = [await status_of(pool, "orders", cid) for cid in ids]
    assert statuses[:3] == [statuses[0], "CANCELED", "PENDING"]
    assert statuses[0] in ("COMPLETED", "CANCELED") and statuses[3] in ("PENDING", "COMPLETED")
    assert len(await read_replies(pool, "orders__replies")) == 4 - statuses.count("PENDING")
    assert await queue_depth(pool, "orders__commands") == statuses.count("PENDING")


async def test_unknown_and_non_tsq_commands_are_refused(pool: Pool) -> None:
    tsq = TroubleshootingQueue(pool)
    unknown = uuid4()
    with pytest.raises(CommandNotFoundError) as exc:
        await tsq.operator_retry("orders", unknown)
    assert (exc.value.domain, exc.value.command_id) == ("orders", str(unknown))
    with pytest.raises(CommandNotFoundError):
        await tsq.operator_cancel("orders", unknown, "x")
    with pytest.raises(CommandNotFoundError):
        await tsq.operator_complete("orders", unknown)

    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "Charge", cid, {})
    await bus.close()
    for call in (
        tsq.operator_retry("orders", cid),
        tsq.operator_cancel("orders", cid, "x"),
        tsq.operator_complete("orders", cid),
    ):
        with pytest.raises(InvalidOperationError, match="status: PENDING"):
            await call
    assert await status_of(pool, "orders", cid) == "PENDING"
    assert await events(pool, cid) == ["SENT"]
    with pytest.raises(CommandNotFoundError):  # the same id in another domain
        await tsq.operator_cancel("billing", cid, "x")
    with pytest.raises(InvalidNameError):
        await tsq.operator_retry("Orders", cid)


async def test_retry_without_archived_message_is_refused(pool: Pool) -> None:
    [cid] = await to_tsq(pool, "orders")
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM pgmq.a_orders__commands")  # test-only table name
    tsq = TroubleshootingQueue(pool)
    [item] = await tsq.list_troubleshooting("orders")
    assert item.payload is None
    with pytest.raises(InvalidOperationError, match="Payload not found"):
        await tsq.operator_retry("orders", cid)
    assert await status_of(pool, "orders", cid) == "IN_TROUBLESHOOTING_QUEUE"
    await tsq.operator_cancel("orders", cid, "payload lost")  # still resolvable
    assert await status_of(pool, "orders", cid) == "CANCELED"


async def test_bulk_retry_and_cancel_in_chunks(pool: Pool) -> None:
    batch_id = await new_batch(pool, "orders", 10)
    charges = await to_tsq(pool, "orders", "Charge", 7, batch_id=batch_id)
    refunds = await to_tsq(
        pool, "orders", "Refund", 3, batch_id=batch_id, reply_to="orders__replies"
    )
    tsq = TroubleshootingQueue(pool)
    progress: list[int] = []

    retried = await tsq.retry_all(
        "orders", command_type="Charge", operator="dan", chunk_size=3,
        on_progress=progress.append,
    )  # fmt: skip
    assert retried == 7 and progress == [3, 6, 7]
    assert {await status_of(pool, "orders", c) for c in charges} == {"PENDING"}
    assert await queue_depth(pool, "orders__commands") == 7
    assert (await audit_details(pool, charges[0], "OPERATOR_RETRY"))["operator"] == "dan"
    assert await batch_row(pool, "orders", batch_id) == ("IN_PROGRESS", 0, 0, 0, 3)

    canceled = await tsq.cancel_all("orders", "bulk cleanup", operator="dan", chunk_size=2)
    assert canceled == 3
    assert {await status_of(pool, "orders", c) for c in refunds} == {"CANCELED"}
    replies = await read_replies(pool, "orders__replies")
    assert {r["command_id"] for r in replies} == {str(c) for c in refunds}
    assert {(r["outcome"], r["reason"]) for r in replies} == {("CANCELED", "bulk cleanup")}
    assert await batch_row(pool, "orders", batch_id) == ("IN_PROGRESS", 0, 0, 3, 0)
    assert await tsq.count_troubleshooting("orders") == 0
    assert await tsq.retry_all("orders") == 0
    assert await tsq.cancel_all("orders", "nothing left") == 0
    with pytest.raises(ValidationError):
        await tsq.retry_all("orders", chunk_size=0)


async def test_bulk_retry_skips_lost_payloads_and_keeps_to_its_cutoff(pool: Pool) -> None:
    ids = await to_tsq(pool, "orders", n=5)
    lost = sorted(ids)[1:3]
    async with pool.connection() as conn:
        await conn.execute(
            "DELETE FROM pgmq.a_orders__commands WHERE message->>'command_id' = ANY(%s)",
            ([str(c) for c in lost],),
        )  # test-only table name
    # Nothing that entered the TSQ after the cutoff is touched.
    assert await fetch(
        pool,
        "SELECT examined, affected FROM commandbus.tsq_retry_all_v1("
        "'orders', NULL, NULL, 10, now() - interval '1 hour', NULL)",
    ) == [(0, 0)]
    tsq = TroubleshootingQueue(pool)
    assert await tsq.retry_all("orders", chunk_size=2) == 3
    assert {c for c in ids if await status_of(pool, "orders", c) == "PENDING"} == set(ids) - set(
        lost
    )
    assert {i.command_id for i in await tsq.list_troubleshooting("orders")} == set(lost)


async def test_retry_of_a_malformed_message_makes_it_claimable(pool: Pool) -> None:
    async with pool.connection() as conn:
        await conn.execute("SELECT commandbus.ensure_queue_v1('orders__commands')")
        await conn.execute(
            "SELECT pgmq.send('orders__commands', %s::jsonb)",
            ('{"command_type": "Charge", "data": {"amount": 3}}',),
        )
    worker = Worker(pool, "orders")
    try:
        assert await worker.receive() == []  # moved to the TSQ, not handed out
        tsq = TroubleshootingQueue(pool)
        [item] = await tsq.list_troubleshooting("orders")
        assert item.last_error_code == "MALFORMED_MESSAGE"
        assert item.payload == {"command_type": "Charge", "data": {"amount": 3}}
        await tsq.operator_retry("orders", item.command_id, operator="eve")
        [received] = await worker.receive()
        assert received.command.command_id == item.command_id
        assert received.command.data == {"amount": 3}
        await worker.complete(received, {"ok": True})
    finally:
        await worker.close()
    assert await status_of(pool, "orders", item.command_id) == "COMPLETED"
