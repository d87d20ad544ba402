"""The monitor read model (commandbus.ops.monitor) against a real database."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from itest_helpers import fetch, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BusinessRuleException,
    Command,
    CommandBus,
    CommandStatus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    SendRequest,
)
from commandbus.exceptions import ValidationError
from commandbus.ops import monitor as monitor_mod
from commandbus.ops.monitor import CommandFilter, Monitor, decode_cursor, encode_cursor
from commandbus.testing import drain_queue

Pool = AsyncConnectionPool[Any]


def _registry() -> HandlerRegistry:
    registry = HandlerRegistry()

    async def work(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        n = int(cmd.data["n"])
        if n % 5 == 0:
            raise PermanentCommandError("DECLINED", "declined")
        if n % 7 == 0:
            raise BusinessRuleException("RULE", "against the rules")
        return {"n": n}

    registry.register("mon", "Work", work)
    registry.register("mon", "Other", work)
    return registry


async def _send(pool: Pool, n: int, command_type: str = "Work") -> list[UUID]:
    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(n)]
    try:
        await bus.send_batch(
            [SendRequest("mon", command_type, cid, {"n": i}) for i, cid in enumerate(ids)]
        )
    finally:
        await bus.close()
    return ids


async def test_domain_stats_and_throughput(pool: Pool) -> None:
    ids = await _send(pool, 70)
    monitor = Monitor(pool)
    [before] = await monitor.domain_stats()
    assert before.domain == "mon"
    assert before.queue_depth == 70 and before.queue_depth_exact
    assert before.counts_by_status["PENDING"] == 70
    assert before.oldest_waiting_seconds is not None and before.oldest_waiting_seconds >= 0

    await drain_queue(pool, "mon", _registry())
    async with pool.connection() as conn:
        await conn.execute("ANALYZE commandbus.command")
    [after] = await monitor.domain_stats()
    tsq = sum(1 for i in range(70) if i % 5 == 0)
    failed = sum(1 for i in range(70) if i % 5 != 0 and i % 7 == 0)
    completed = 70 - tsq - failed
    assert after.tsq_size == tsq
    assert after.counts_by_status["IN_TROUBLESHOOTING_QUEUE"] == tsq
    assert after.queue_depth == 0
    assert after.oldest_waiting_seconds is None
    # ANALYZE reads every row of a table this small: the estimates are exact.
    assert after.counts_by_status["COMPLETED"] == completed
    assert after.counts_by_status["FAILED"] == failed
    assert after.counts_by_status["CANCELED"] == 0  # covered by the statistics, absent
    assert after.completed_per_s == pytest.approx(completed / 60)
    assert after.failed_per_s == pytest.approx((tsq + failed) / 60)

    points = await monitor.throughput(minutes=5)
    assert len(points) == 5 * 60 // monitor_mod.BUCKET_SECONDS
    assert sum(p.completed for p in points) == completed
    assert sum(p.failed for p in points) == tsq + failed
    assert points == sorted(points, key=lambda p: p.at)
    assert (await monitor.throughput(minutes=5, domain="other")) and all(
        p.completed == 0 for p in await monitor.throughput(minutes=5, domain="other")
    )
    assert len(ids) == 70
    with pytest.raises(ValidationError, match="minutes"):
        await monitor.throughput(minutes=61)


async def test_throughput_keeps_settled_buckets(pool: Pool) -> None:
    """Settled buckets are read once: rows moved into the past are still counted from memory,
    and a refresh reads only the unsettled tail."""
    await _send(pool, 10)
    await drain_queue(pool, "mon", _registry())
    # Age the audit rows by two minutes: they are in settled buckets now.
    async with pool.connection() as conn:
        await conn.execute("UPDATE commandbus.audit SET ts = ts - interval '2 minutes'")
    monitor = Monitor(pool)
    first = await monitor.throughput(minutes=10)
    done = sum(p.completed for p in first)
    assert done == 7  # n = 0 and 5 go to the TSQ, 7 fails a business rule
    # Rows deleted from a settled bucket do not change what the monitor remembers...
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM commandbus.audit WHERE event_type = 'COMPLETED'")
    assert sum(p.completed for p in await monitor.throughput(minutes=10)) == done
    # ... while a new Monitor, or a longer window than it has read, reads the table again.
    assert sum(p.completed for p in await Monitor(pool).throughput(minutes=10)) == 0
    assert sum(p.completed for p in await monitor.throughput(minutes=20)) == 0


async def test_throughput_reads_only_what_was_written_since(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first read a refresh reads the audit rows newer than what it has settled (a
    few seconds' worth under load, not the whole window): rows it settled are counted from
    memory, new ones are added, none twice."""
    monkeypatch.setattr(monitor_mod, "_SETTLE", timedelta(seconds=0))
    monitor = Monitor(pool)
    assert sum(p.completed for p in await monitor.throughput(minutes=10)) == 0
    await _send(pool, 10)
    await drain_queue(pool, "mon", _registry())
    # Read once (the rows are fresh), then again: the first read's mark is old enough now, and
    # everything up to it is settled.
    assert sum(p.completed for p in await monitor.throughput(minutes=10)) == 7
    assert sum(p.completed for p in await monitor.throughput(minutes=10)) == 7
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM commandbus.audit WHERE event_type = 'COMPLETED'")
    # Settled rows are never read again: still 7, from memory.
    assert sum(p.completed for p in await monitor.throughput(minutes=10)) == 7
    await _send(pool, 10)
    await drain_queue(pool, "mon", _registry())
    points = await monitor.throughput(minutes=10)
    assert sum(p.completed for p in points) == 14
    assert sum(p.failed for p in points) == 2 * 3
    assert sum(p.completed for p in await monitor.throughput(minutes=10)) == 14
    # A Monitor that reuses a read for a while (the console's) answers from it meanwhile.
    cached = Monitor(pool, reuse_seconds=60.0)
    first = sum(p.completed for p in await cached.throughput(minutes=10))
    await _send(pool, 10)
    await drain_queue(pool, "mon", _registry())
    assert sum(p.completed for p in await cached.throughput(minutes=10)) == first
    assert sum(p.completed for p in await Monitor(pool).throughput(minutes=10)) == first + 7


async def test_list_commands_keyset_pages(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = await _send(pool, 23)
    others = await _send(pool, 4, "Other")
    monitor = Monitor(pool)
    seen: list[UUID] = []
    cursor = None
    while True:
        page = await monitor.list_commands(CommandFilter(domain="mon"), cursor=cursor, limit=5)
        seen += [c.command_id for c in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids + others) and len(seen) == 27
    rows = await fetch(
        pool,
        "SELECT command_id FROM commandbus.command ORDER BY created_at DESC, command_id DESC",
    )
    assert seen == [r[0] for r in rows]

    page = await monitor.list_commands(CommandFilter(command_type="Other"))
    assert sorted(c.command_id for c in page.items) == sorted(others)
    assert page.next_cursor is None
    page = await monitor.list_commands(CommandFilter(command_id=ids[3]))
    assert [c.command_id for c in page.items] == [ids[3]]
    assert page.items[0].status is CommandStatus.PENDING
    page = await monitor.list_commands(CommandFilter(status=CommandStatus.COMPLETED))
    assert page.items == [] and page.next_cursor is None
    page = await monitor.list_commands(CommandFilter(domain="nowhere"))
    assert page.items == []

    # A scan that reads its limit without filling the page returns a cursor that resumes it.
    monkeypatch.setattr(monitor_mod, "SCAN_LIMIT", 10)
    page = await monitor.list_commands(CommandFilter(command_type="Other"), limit=50)
    found = [c.command_id for c in page.items]
    assert page.scanned == 10 and page.next_cursor is not None
    while page.next_cursor is not None:
        page = await monitor.list_commands(
            CommandFilter(command_type="Other"), cursor=page.next_cursor, limit=50
        )
        found += [c.command_id for c in page.items]
    assert sorted(found) == sorted(others)


async def test_list_commands_by_batch_and_time(pool: Pool) -> None:
    bus = CommandBus(pool)
    try:
        from commandbus import BatchCommand

        result = await bus.create_batch(
            "mon", [BatchCommand("Work", uuid4(), {"n": i}) for i in range(3)]
        )
    finally:
        await bus.close()
    await _send(pool, 5)
    monitor = Monitor(pool)
    page = await monitor.list_commands(CommandFilter(batch_id=result.batch_id))
    assert len(page.items) == 3 and all(c.batch_id == result.batch_id for c in page.items)
    newest = (await monitor.list_commands(CommandFilter(), limit=1)).items[0].created_at
    page = await monitor.list_commands(CommandFilter(created_after=newest + timedelta(seconds=1)))
    assert page.items == []
    page = await monitor.list_commands(CommandFilter(created_before=newest))
    assert len(page.items) == 8


async def test_cursor_and_filter_validation(pool: Pool) -> None:
    monitor = Monitor(pool)
    with pytest.raises(ValidationError, match="cursor"):
        await monitor.list_commands(CommandFilter(), cursor="not-a-cursor")
    with pytest.raises(ValidationError, match="limit"):
        await monitor.list_commands(CommandFilter(), limit=0)
    with pytest.raises(ValidationError, match="status"):
        await monitor.list_commands(CommandFilter(status="NOPE"))  # type: ignore[arg-type]
    rows = await fetch(pool, "SELECT now()")
    cid = uuid4()
    assert decode_cursor(encode_cursor(rows[0][0], cid)) == (rows[0][0], cid)


async def test_workers_seen(pool: Pool, database_url: str) -> None:
    monitor = Monitor(pool)
    assert await monitor.workers() == []
    conn = await psycopg.AsyncConnection.connect(
        database_url, application_name="rcmd worker mon host-1:4242"
    )
    try:
        [w] = await monitor.workers()
        assert (w.domain, w.name, w.connections, w.connected) == ("mon", "host-1:4242", 1, True)
    finally:
        await conn.close()

    async def gone() -> bool:  # a closed backend leaves pg_stat_activity a moment later
        [w] = await monitor.workers()
        return not w.connected and w.connections == 0

    await wait_until(gone)
