"""Retention: prune deletes old terminal commands with their rows and messages, nothing else."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from itest_helpers import events, fetch, status_of, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BusinessRuleException,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    RetryPolicy,
    ValidationError,
    Worker,
)
from commandbus.pgmq import PgmqClient
from commandbus.retention import PruneResult, RetentionPolicy, prune, run_retention

FAST = RetryPolicy(max_attempts=3, backoff_schedule=[0])
OLD = "now() - interval '2 days'"


async def age(pool: AsyncConnectionPool[Any], *ids: UUID) -> None:
    """Make commands look created and last updated two days ago, with their audit rows (test-only
    SQL; a real row is never updated before it was created, which prune relies on). The audit
    rows move out of today's partition: no day partition covers two days ago in a new database,
    so they land in audit_default, where prune deletes them with their commands."""
    await fetch(
        pool,
        f"UPDATE commandbus.command SET created_at = {OLD}, updated_at = {OLD}"
        " WHERE command_id = ANY(%s) RETURNING 1",
        list(ids),
    )
    await fetch(
        pool,
        f"UPDATE commandbus.audit SET ts = {OLD} WHERE command_id = ANY(%s) RETURNING 1",
        list(ids),
    )


async def archived_ids(pool: AsyncConnectionPool[Any], queue: str) -> set[str]:
    rows = await fetch(pool, f"SELECT message->>'command_id' FROM pgmq.a_{queue}")
    return {r[0] for r in rows}


async def live_ids(pool: AsyncConnectionPool[Any], queue: str) -> set[str]:
    rows = await fetch(pool, f"SELECT message->>'command_id' FROM pgmq.q_{queue}")
    return {r[0] for r in rows}


async def run_to_outcomes(pool: AsyncConnectionPool[Any], bus: CommandBus) -> dict[str, UUID]:
    """Ok -> COMPLETED, Rule -> FAILED, Perm -> TSQ through a real worker."""
    registry = HandlerRegistry()

    @registry.handler("orders", "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> dict[str, int]:
        return {"ok": 1}

    @registry.handler("orders", "Rule")
    async def rule(cmd: Command, ctx: HandlerContext) -> None:
        raise BusinessRuleException("NOPE", "rule")

    @registry.handler("orders", "Perm")
    async def perm(cmd: Command, ctx: HandlerContext) -> None:
        raise PermanentCommandError("BROKEN", "perm")

    ids = {name: uuid4() for name in ("Ok", "Rule", "Perm")}
    for name, cid in ids.items():
        await bus.send("orders", name, cid, {"n": name})
    worker = Worker(pool, "orders", registry, retry_policy=FAST)
    task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
    expected = {"Ok": "COMPLETED", "Rule": "FAILED", "Perm": "IN_TROUBLESHOOTING_QUEUE"}
    try:
        for name, status in expected.items():

            async def check(name: str = name, status: str = status) -> bool:
                return await status_of(pool, "orders", ids[name]) == status

            await wait_until(check)
    finally:
        await worker.stop(timeout=5)
        await task
    return ids


async def test_prune_deletes_only_old_terminal_commands(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    ids = await run_to_outcomes(pool, bus)
    pending, in_progress, canceled, stale, recent = (uuid4() for _ in range(5))
    for cid in (pending, in_progress, canceled, stale, recent):
        await bus.send("orders", "Later", cid, {"x": 1})
    await fetch(
        pool,
        "UPDATE commandbus.command SET status = CASE command_id"
        " WHEN %s THEN 'IN_PROGRESS' WHEN %s THEN 'CANCELED' ELSE 'COMPLETED' END"
        " WHERE command_id IN (%s, %s, %s, %s) RETURNING 1",
        in_progress, canceled, in_progress, canceled, stale, recent,
    )  # fmt: skip
    # The canceled one has an archived message and an archived payload, as after an
    # operator cancel; `stale` keeps its message in the live queue.
    [(canceled_msg,)] = await fetch(
        pool, "SELECT msg_id FROM commandbus.command WHERE command_id = %s", canceled
    )
    await PgmqClient(pool).archive("orders__commands", canceled_msg)
    await fetch(
        pool,
        "INSERT INTO commandbus.payload_archive (domain, command_id, payload_json)"
        " VALUES ('orders', %s, '{\"x\": 1}'), ('orders', %s, '{\"y\": 2}') RETURNING 1",
        canceled, ids["Perm"],
    )  # fmt: skip
    old = [*ids.values(), pending, in_progress, canceled, stale]
    await age(pool, *old)

    progress: list[PruneResult] = []
    result = await prune(pool, timedelta(days=1), on_progress=progress.append)

    gone = [ids["Ok"], ids["Rule"], canceled, stale]
    kept = {ids["Perm"]: "IN_TROUBLESHOOTING_QUEUE", pending: "PENDING",
            in_progress: "IN_PROGRESS", recent: "COMPLETED"}  # fmt: skip
    for cid in gone:
        assert await status_of(pool, "orders", cid) is None
        assert await events(pool, cid) == []
    for cid, status in kept.items():
        assert await status_of(pool, "orders", cid) == status
        assert "SENT" in await events(pool, cid)
    assert (result.commands, result.payloads, result.batches) == (4, 1, 0)
    # SENT+RECEIVED+COMPLETED, SENT+RECEIVED+BUSINESS_RULE_FAILED, SENT, SENT
    assert result.audit_events == 8
    # Rule's and canceled's archived messages, stale's live one (Ok's was deleted at completion).
    assert result.messages == 3
    assert await archived_ids(pool, "orders__commands") == {str(ids["Perm"])}
    assert await live_ids(pool, "orders__commands") == {str(pending), str(in_progress),
                                                        str(recent)}  # fmt: skip
    assert await fetch(pool, "SELECT command_id FROM commandbus.payload_archive") == [
        (ids["Perm"],)
    ]
    assert progress[-1] == result and result.chunks == len(progress) == 2
    assert result.cutoff is not None

    # Nothing left to do: a second run deletes nothing.
    again = await prune(pool, timedelta(days=1))
    assert (again.commands, again.audit_events, again.messages, again.chunks) == (0, 0, 0, 1)
    await bus.close()


async def test_prune_in_chunks_with_domain_filter(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    orders = [uuid4() for _ in range(25)]
    other = [uuid4() for _ in range(3)]
    for cid in orders:
        await bus.send("orders", "Done", cid, {})
    for cid in other:
        await bus.send("billing", "Done", cid, {})
    await fetch(pool, "UPDATE commandbus.command SET status = 'COMPLETED' RETURNING 1")
    await age(pool, *orders, *other)

    progress: list[PruneResult] = []
    result = await prune(pool, timedelta(hours=1), "orders", chunk_size=10,
                         on_progress=progress.append)  # fmt: skip
    # (before the chunks, depending on the time of day, yesterday's empty command partition may
    # be dropped; after them, yesterday's empty audit partition)
    assert [p.commands for p in progress if p.chunks][:4] == [10, 20, 25, 25]
    assert result.commands == 25 and result.chunks == 4
    assert result.audit_events == 25 and result.messages == 25  # SENT rows; live messages
    assert await fetch(pool, "SELECT domain, count(*) FROM commandbus.command GROUP BY 1") == [
        ("billing", 3)
    ]
    assert await live_ids(pool, "billing__commands") == {str(c) for c in other}

    # An explicit cutoff: everything before it, in all domains.
    result = await prune(pool, datetime.now(UTC) - timedelta(hours=1))
    assert result.commands == 3
    await bus.close()


async def test_prune_goes_on_where_the_chunk_before_stopped(pool: AsyncConnectionPool[Any]) -> None:
    """Each chunk starts at the previous chunk's last created_at (prune_v2's p_after): rows
    before it are not walked again, live rows between terminal ones are passed over and kept."""
    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(12)]
    for cid in ids:
        await bus.send("orders", "Done", cid, {})
    # created_at one minute apart, two days ago; every third command still PENDING.
    await fetch(
        pool,
        "UPDATE commandbus.command c SET created_at = now() - interval '2 days'"
        " + i.n * interval '1 minute', updated_at = now() - interval '2 days'"
        " + i.n * interval '1 minute',"
        " status = CASE WHEN i.n %% 3 = 2 THEN 'PENDING' ELSE 'COMPLETED' END"
        " FROM unnest(%s::uuid[]) WITH ORDINALITY AS i(id, n) WHERE c.command_id = i.id"
        " RETURNING 1",
        ids,
    )
    cutoff = (await fetch(pool, "SELECT now() - interval '1 hour'"))[0][0]
    [(t4,)] = await fetch(
        pool, "SELECT created_at FROM commandbus.command WHERE command_id = %s", ids[3]
    )
    # From the 4th command on (its created_at), chunks of 2: the first three are not walked.
    [row] = await fetch(
        pool,
        "SELECT commands, last_created_at FROM commandbus.prune_v2(%s, NULL, 2, %s)",
        cutoff,
        t4,
    )
    assert row == (2, t4 + timedelta(minutes=2))  # the 4th and the 6th (the 5th is PENDING)
    left = {r[0] for r in await fetch(pool, "SELECT command_id FROM commandbus.command")}
    assert left == set(ids) - {ids[3], ids[5]}

    progress: list[PruneResult] = []
    result = await prune(pool, cutoff, chunk_size=3, on_progress=progress.append)
    assert result.commands == 8 - 2
    assert [p.commands for p in progress if p.chunks][:3] == [3, 6, 6]
    pending = {r[0] for r in await fetch(pool, "SELECT command_id FROM commandbus.command")}
    assert pending == {ids[i] for i in range(12) if (i + 1) % 3 == 2}
    await bus.close()


async def test_prune_batches_left_empty(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    done_batch, open_batch, empty_old, empty_new = (uuid4() for _ in range(4))
    # Batches are open while commands are sent into them (a complete batch takes no more),
    # then set to their final state as the scenario needs.
    await fetch(
        pool,
        "INSERT INTO commandbus.batch (domain, batch_id) VALUES"
        " ('orders', %s), ('orders', %s) RETURNING 1",
        done_batch, open_batch,
    )  # fmt: skip
    await fetch(
        pool,
        "INSERT INTO commandbus.batch (domain, batch_id, status, total_count, completed_count,"
        " created_at, completed_at) VALUES"
        f" ('orders', %s, 'COMPLETED', 0, 0, {OLD}, {OLD}),"
        " ('orders', %s, 'COMPLETED', 0, 0, now(), now()) RETURNING 1",
        empty_old, empty_new,
    )  # fmt: skip
    await fetch(
        pool,
        "INSERT INTO commandbus.audit (domain, command_id, event_type) VALUES"
        " ('orders', %s, 'BATCH_COMPLETED'), ('orders', %s, 'BATCH_COMPLETED') RETURNING 1",
        done_batch, open_batch,
    )  # fmt: skip
    done_cmd, open_done, open_tsq = uuid4(), uuid4(), uuid4()
    await bus.send("orders", "X", done_cmd, {}, batch_id=done_batch)
    await bus.send("orders", "X", open_done, {}, batch_id=open_batch)
    await bus.send("orders", "X", open_tsq, {}, batch_id=open_batch)
    await fetch(
        pool,
        "UPDATE commandbus.batch SET created_at = " + OLD + ", completed_at = " + OLD + ","
        " status = CASE WHEN batch_id = %s THEN 'COMPLETED' ELSE 'COMPLETED_WITH_FAILURES' END,"
        " completed_count = 1 WHERE batch_id IN (%s, %s) RETURNING 1",
        done_batch, done_batch, open_batch,
    )  # fmt: skip
    await fetch(
        pool,
        "UPDATE commandbus.command SET status = CASE WHEN command_id = %s"
        " THEN 'IN_TROUBLESHOOTING_QUEUE' ELSE 'COMPLETED' END RETURNING 1",
        open_tsq,
    )
    await age(pool, done_cmd, open_done, open_tsq, done_batch, open_batch)

    result = await prune(pool, timedelta(days=1))
    assert (result.commands, result.batches) == (2, 2)
    rows = await fetch(pool, "SELECT batch_id FROM commandbus.batch")
    assert {r[0] for r in rows} == {open_batch, empty_new}
    assert await events(pool, done_batch) == []
    assert await events(pool, open_batch) == ["BATCH_COMPLETED"]
    assert await status_of(pool, "orders", open_tsq) == "IN_TROUBLESHOOTING_QUEUE"
    await bus.close()


async def test_prune_removes_every_message_of_a_retried_command(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    pgmq = PgmqClient(pool)
    cid, stranger, orphan = uuid4(), uuid4(), uuid4()
    await bus.send("orders", "X", cid, {})
    await bus.send("orders", "X", stranger, {})
    # An earlier delivery of the same command (as after an operator retry): archived, and
    # named by msg_id in the audit trail; an archived message of a command still pending (kept),
    # and one of a command that does not exist (swept with the old archive).
    old_msg = await pgmq.send("orders__commands", {"command_id": str(cid), "data": {}})
    foreign = await pgmq.send("orders__commands", {"command_id": str(stranger), "data": {}})
    lost = await pgmq.send("orders__commands", {"command_id": str(orphan), "data": {}})
    await pgmq.archive_batch("orders__commands", [old_msg, foreign, lost])
    await fetch(pool, f"UPDATE pgmq.a_orders__commands SET archived_at = {OLD} RETURNING 1")
    await fetch(
        pool,
        "INSERT INTO commandbus.audit (domain, command_id, event_type, details_json) VALUES"
        " ('orders', %s, 'OPERATOR_RETRY', jsonb_build_object('msg_id', %s::bigint)),"
        " ('orders', %s, 'RECEIVED', jsonb_build_object('msg_id', %s::bigint)) RETURNING 1",
        cid, old_msg, cid, foreign,
    )  # fmt: skip
    await fetch(
        pool, "UPDATE commandbus.command SET status = 'COMPLETED' WHERE command_id = %s"
        " RETURNING 1", cid,
    )  # fmt: skip
    await age(pool, cid, stranger)
    result = await prune(pool, timedelta(days=1))
    # The command's live message, then the archive's old_msg and lost.
    assert (result.commands, result.audit_events, result.messages) == (1, 3, 3)
    assert await archived_ids(pool, "orders__commands") == {str(stranger)}
    assert await live_ids(pool, "orders__commands") == {str(stranger)}
    await bus.close()


async def test_run_retention_prunes_until_stopped(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "X", cid, {})
    await fetch(pool, "UPDATE commandbus.command SET status = 'CANCELED' RETURNING 1")
    await age(pool, cid)
    stop = asyncio.Event()
    policy = RetentionPolicy(older_than=timedelta(days=1), interval=0.05)
    task = asyncio.create_task(
        run_retention(pool, policy.for_domain("orders"), stop, initial_delay=0)
    )

    async def pruned() -> bool:
        return await status_of(pool, "orders", cid) is None

    await wait_until(pruned, timeout=10)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    await bus.close()


async def test_validation(pool: AsyncConnectionPool[Any]) -> None:
    with pytest.raises(ValidationError):
        await prune(pool, timedelta(days=-1))
    with pytest.raises(ValidationError):
        await prune(pool, datetime(2020, 1, 1))  # naive
    with pytest.raises(ValidationError):
        await prune(pool, timedelta(days=1), chunk_size=0)
    with pytest.raises(ValidationError):
        await prune(pool, timedelta(days=1), "Bad-Domain")
    with pytest.raises(ValidationError):
        RetentionPolicy(older_than=timedelta(days=1), interval=0)
    with pytest.raises(ValidationError, match="max_duty"):
        RetentionPolicy(older_than=timedelta(days=1), max_duty=0)
    with pytest.raises(ValidationError, match="max_duty"):
        await prune(pool, timedelta(days=1), max_duty=1.5)
    policy = RetentionPolicy(older_than=timedelta(days=7))
    assert policy.for_domain("orders").domain == "orders"
    assert policy.for_domain("orders").for_domain("billing").domain == "orders"
