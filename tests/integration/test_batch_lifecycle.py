"""One mixed batch through every kind of step — worker successes, a TSQ move, a business-rule
failure, then operator retry, complete and cancel — with the counters and status checked after
each step, and on_complete firing exactly once at the end."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

from itest_helpers import fetch, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BatchCommand,
    BatchMetadata,
    BusinessRuleException,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    TroubleshootingQueue,
    Worker,
)

Counters = tuple[str, int, int, int, int, int]  # status, total, completed, failed, canceled, tsq


async def counters(pool: AsyncConnectionPool[Any], batch_id: UUID) -> Counters:
    [row] = await fetch(
        pool,
        "SELECT status, total_count, completed_count, failed_count, canceled_count,"
        " in_troubleshooting_count FROM commandbus.batch WHERE batch_id = %s",
        batch_id,
    )
    return (str(row[0]), *(int(x) for x in row[1:]))  # type: ignore[return-value]


async def test_mixed_batch_counters_after_every_step(pool: AsyncConnectionPool[Any]) -> None:
    registry = HandlerRegistry()
    fixed: set[str] = set()

    @registry.handler("billing", "Pay")
    async def pay(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        kind = cmd.data["kind"]
        if kind == "declined" and kind not in fixed:
            raise PermanentCommandError("DECLINED", "card declined")
        if kind in ("stuck_a", "stuck_b"):
            raise PermanentCommandError("GATEWAY_DOWN", "needs an operator")
        if kind == "closed":
            raise BusinessRuleException("ACCOUNT_CLOSED", "account closed")
        return {"paid": kind}

    bus = CommandBus(pool)
    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch)

    kinds = ["ok1", "ok2", "declined", "closed", "stuck_a", "stuck_b"]
    ids = {k: uuid4() for k in kinds}
    result = await bus.create_batch(
        "billing",
        [BatchCommand("Pay", ids[k], {"kind": k}, reply_to="billing__replies") for k in kinds],
        name="mixed",
        on_complete=on_complete,
    )
    batch_id = result.batch_id
    assert await counters(pool, batch_id) == ("PENDING", 6, 0, 0, 0, 0)

    # Step 1: the worker: 2 successes, 3 TSQ moves, 1 business-rule failure.
    worker = Worker(pool, "billing", registry)
    task = asyncio.create_task(worker.run(concurrency=8, poll_interval=0.05))

    async def worked() -> bool:
        c = await counters(pool, batch_id)
        return c[2] + c[3] + c[5] == 6

    try:
        await wait_until(worked)
        assert await counters(pool, batch_id) == ("IN_PROGRESS", 6, 2, 1, 0, 3)

        tsq = TroubleshootingQueue(pool)
        assert await tsq.count_troubleshooting("billing") == 3

        # Step 2: operator retry of the declined one (now fixed): back in flight, then done.
        fixed.add("declined")
        await tsq.operator_retry("billing", ids["declined"], operator="alice")

        async def retried_done() -> bool:
            return (await counters(pool, batch_id))[2] == 3

        await wait_until(retried_done)
        assert await counters(pool, batch_id) == ("IN_PROGRESS", 6, 3, 1, 0, 2)

        # Step 3: operator complete of one stuck command.
        await tsq.operator_complete("billing", ids["stuck_a"], {"manual": True}, operator="bob")
        assert await counters(pool, batch_id) == ("IN_PROGRESS", 6, 4, 1, 0, 1)
        assert fired == []

        # Step 4: operator cancel of the last one: everything terminal -> complete.
        await tsq.operator_cancel("billing", ids["stuck_b"], "gave up", operator="eve")
        assert await counters(pool, batch_id) == ("COMPLETED_WITH_FAILURES", 6, 4, 1, 1, 0)

        async def callback_fired() -> bool:
            return len(fired) == 1

        await wait_until(callback_fired)
        await asyncio.sleep(0.3)  # and not again
        assert len(fired) == 1
        assert fired[0].batch_id == batch_id and fired[0].canceled_count == 1
    finally:
        await worker.stop(timeout=5)
        await task
        await bus.close()

    events = [
        r[0]
        for r in await fetch(
            pool,
            "SELECT event_type FROM commandbus.audit WHERE command_id = %s ORDER BY audit_id",
            batch_id,
        )
    ]
    assert events == ["BATCH_STARTED", "BATCH_COMPLETED"]
    operators = {
        r[0]: r[1]
        for r in await fetch(
            pool,
            "SELECT event_type, details_json->>'operator' FROM commandbus.audit"
            " WHERE event_type LIKE 'OPERATOR_%%' AND domain = 'billing'",
        )
    }
    assert operators == {
        "OPERATOR_RETRY": "alice",
        "OPERATOR_COMPLETE": "bob",
        "OPERATOR_CANCEL": "eve",
    }
