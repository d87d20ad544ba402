"""The audit trail partitioned by day (V004): creation ahead of time (also concurrent), rows
outside every day, retention by whole partitions that keeps what is still in use, and the
upgrade in place of a database holding many audit rows (attached, not rewritten)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from itest_helpers import events, fetch, status_of
from psycopg_pool import AsyncConnectionPool
from test_setup import PREDECESSOR_SCHEMA

from commandbus import CommandBus, ValidationError, _sql, setup_database
from commandbus.embedded import install_pgmq
from commandbus.retention import ensure_partitions, prune


def _today() -> date:
    return datetime.now(UTC).date()


async def partitions(pool: AsyncConnectionPool[Any]) -> dict[str, tuple[Any, Any, bool]]:
    rows = await fetch(pool, "SELECT * FROM commandbus.audit_partitions_v1()")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def partition_of(pool: AsyncConnectionPool[Any], command_id: UUID) -> set[str]:
    rows = await fetch(
        pool,
        "SELECT DISTINCT tableoid::regclass::text FROM commandbus.audit WHERE command_id = %s",
        command_id,
    )
    return {r[0] for r in rows}


async def test_audit_is_partitioned_by_day(pool: AsyncConnectionPool[Any]) -> None:
    [(kind,)] = await fetch(
        pool, "SELECT relkind FROM pg_class WHERE oid = 'commandbus.audit'::regclass"
    )
    assert kind == "p"
    parts = await partitions(pool)
    today = _today()
    days = [today + timedelta(days=k) for k in range(-1, 8)]
    for day in days:
        lo, hi, _ = parts[f"audit_{day:%Y%m%d}"]
        assert lo == datetime(day.year, day.month, day.day, tzinfo=UTC)
        assert hi - lo == timedelta(days=1)
    assert parts["audit_default"][2] is True
    assert len(parts) == len(days) + 1  # a new database: no legacy partition
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "X", cid, {})
    assert await partition_of(pool, cid) == {f"commandbus.audit_{today:%Y%m%d}"}
    trail = await bus.get_audit_trail(cid, "orders")
    assert [e.event_type for e in trail] == ["SENT"]
    # Calling it again creates nothing; a larger horizon creates the days missing.
    assert await ensure_partitions(pool) == 0
    assert await ensure_partitions(pool, 10) == 6  # 3 days of the audit trail and of commands
    with pytest.raises(ValidationError, match="days_ahead"):
        await ensure_partitions(pool, -1)
    await bus.close()


@pytest.mark.parametrize("table", ["audit", "command"])
async def test_concurrent_creators_make_each_partition_once(
    pool: AsyncConnectionPool[Any], database_url: str, table: str
) -> None:
    """Six creators of the same 30 days of the audit trail's or the command table's partitions
    (V006) at once, with sends going on: each day made once, every row written."""
    start = _today() + timedelta(days=30)
    end = start + timedelta(days=29)
    bus = CommandBus(pool)

    async def creator() -> int:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT commandbus.ensure_day_partitions_v1(%s::regclass, %s, %s)",
                (f"commandbus.{table}", start, end),
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    async def writer() -> None:
        for _ in range(20):
            await bus.send("orders", "X", uuid4(), {})

    results = await asyncio.gather(*(creator() for _ in range(6)), writer(), writer())
    assert sum(r for r in results if r is not None) == 30
    rows = await fetch(pool, "SELECT * FROM commandbus.day_partitions_v1(%s::regclass)",
                       f"commandbus.{table}")  # fmt: skip
    made = [r[0] for r in rows if r[1] is not None and r[1].date() >= start]
    assert len(made) == 30 and all(n.startswith(f"{table}_") for n in made)
    [(n,)] = await fetch(pool, "SELECT count(*) FROM commandbus.audit WHERE event_type = 'SENT'")
    [(c,)] = await fetch(pool, "SELECT count(*) FROM commandbus.command")
    assert n == c == 40
    await bus.close()


async def test_rows_outside_every_day_wait_in_the_default_partition(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "X", cid, {})
    far = _today() + timedelta(days=40)
    await fetch(
        pool,
        "INSERT INTO commandbus.audit (domain, command_id, event_type, ts)"
        " VALUES ('orders', %s, 'LATE', %s) RETURNING 1",
        cid, datetime(far.year, far.month, far.day, 12, tzinfo=UTC),
    )  # fmt: skip
    assert "commandbus.audit_default" in await partition_of(pool, cid)
    await fetch(pool, "SELECT commandbus.ensure_audit_partitions_v1(%s, %s)", far, far)
    assert await partition_of(pool, cid) == {
        f"commandbus.audit_{_today():%Y%m%d}",
        f"commandbus.audit_{far:%Y%m%d}",
    }
    assert await events(pool, cid) == ["SENT", "LATE"]
    [(n,)] = await fetch(pool, "SELECT count(*) FROM commandbus.audit_default")
    assert n == 0
    await bus.close()


async def test_retention_drops_a_day_only_when_nothing_uses_it(
    pool: AsyncConnectionPool[Any],
) -> None:
    """Commands whose audit rows are in a day past the cutoff: finished ones (alone, in an open
    batch, sent by a running process), a pending one and one in the TSQ. The day is kept, and
    the finished commands of the open batch and process too, until all of them end."""
    bus = CommandBus(pool)
    day = _today() - timedelta(days=3)
    await fetch(pool, "SELECT commandbus.ensure_audit_partitions_v1(%s, %s)", day, day)
    name = f"audit_{day:%Y%m%d}"
    done, pending, tsq, in_batch, in_process = (uuid4() for _ in range(5))
    batch, process = uuid4(), uuid4()
    await fetch(pool, "INSERT INTO commandbus.batch (domain, batch_id) VALUES ('orders', %s)"
                " RETURNING 1", batch)  # fmt: skip
    for cid in (done, pending, tsq, in_process):
        await bus.send("orders", "X", cid, {})
    await bus.send("orders", "X", in_batch, {}, batch_id=batch)
    await fetch(
        pool,
        "INSERT INTO commandbus.process (domain, process_id, process_type, status) VALUES"
        " ('orders', %s, 'P', 'WAITING') RETURNING 1", process,
    )  # fmt: skip
    await fetch(
        pool,
        "INSERT INTO commandbus.process_audit (domain, process_id, step_name, command_id,"
        " command_type, sent_at) VALUES ('orders', %s, 's', %s, 'X', now()) RETURNING 1",
        process, in_process,
    )  # fmt: skip
    # Noon of that day: "now() - 3 days" plus the hour below crossed into the next day when
    # the test ran after 23:00 UTC.
    old = f"TIMESTAMPTZ '{day.isoformat()} 12:00:00+00'"
    await fetch(
        pool,
        "UPDATE commandbus.command SET status = CASE command_id WHEN %s THEN 'PENDING'"
        " WHEN %s THEN 'IN_TROUBLESHOOTING_QUEUE' ELSE 'COMPLETED' END,"
        f" created_at = {old}, updated_at = {old} RETURNING 1",
        pending, tsq,
    )  # fmt: skip
    await fetch(pool, f"UPDATE commandbus.audit SET ts = {old} + interval '1 hour' RETURNING 1")
    for cid in (done, pending, tsq, in_batch, in_process):
        assert await partition_of(pool, cid) == {f"commandbus.{name}"}

    result = await prune(pool, timedelta(days=1))
    assert result.commands == 1  # `done` only
    assert result.partitions_kept == 1 and name in await partitions(pool)
    assert await status_of(pool, "orders", done) is None
    for cid in (pending, tsq, in_batch, in_process):
        assert await events(pool, cid) == ["SENT"]
    assert await status_of(pool, "orders", in_batch) == "COMPLETED"
    assert await status_of(pool, "orders", in_process) == "COMPLETED"

    # The batch and the process end, the pending and TSQ commands finish: the day goes.
    await fetch(pool, "UPDATE commandbus.batch SET status = 'COMPLETED' RETURNING 1")
    await fetch(pool, "UPDATE commandbus.process SET status = 'COMPLETED' RETURNING 1")
    await fetch(
        pool,
        f"UPDATE commandbus.command SET status = 'COMPLETED', updated_at = {old} RETURNING 1",
    )
    result = await prune(pool, timedelta(days=1))
    assert result.commands == 4 and result.partitions >= 1
    assert name not in await partitions(pool)
    for cid in (pending, tsq, in_batch, in_process):
        assert await events(pool, cid) == []
    await bus.close()


AUDIT_ROWS = 300_000


def _fill_audit(conn: psycopg.Connection[Any]) -> None:
    """AUDIT_ROWS audit rows over the last 30 days (10 per command)."""
    conn.execute(
        "INSERT INTO commandbus.audit (domain, command_id, event_type, ts, details_json)"
        " SELECT 'orders', md5((g / 10)::text)::uuid, 'SENT',"
        "        now() - (g::float8 / %s) * interval '30 days', jsonb_build_object('msg_id', g)"
        " FROM generate_series(1, %s) AS g",
        (AUDIT_ROWS, AUDIT_ROWS),
    )


@pytest.mark.parametrize("source", ["predecessor", "baseline"])
async def test_upgrade_attaches_the_old_audit_table(empty_db: str, source: str) -> None:
    """A reliable-cmd 0.2.2 database, or one of our V001 schema, with AUDIT_ROWS audit rows:
    setup_database() attaches the table as the oldest partition, same file (no rewrite)."""
    install_pgmq(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        if source == "predecessor":
            conn.execute(PREDECESSOR_SCHEMA)  # type: ignore[arg-type]
        else:
            v1 = next(text for version, _, text in _sql.migrations() if version == 1)
            conn.execute(v1)  # type: ignore[arg-type]
        _fill_audit(conn)
        row = conn.execute("SELECT pg_relation_filenode('commandbus.audit'),"
                           " max(audit_id) FROM commandbus.audit").fetchone()  # fmt: skip
        assert row is not None
        filenode, max_id = row
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(empty_db, min_size=1, open=False)
    await pool.open()
    try:
        started = time.monotonic()
        await setup_database(pool)
        took = time.monotonic() - started
        parts = await partitions(pool)
        lo, hi, _ = parts["audit_legacy"]
        assert lo is None and hi > datetime.now(UTC)
        assert await fetch(pool, "SELECT pg_relation_filenode('commandbus.audit_legacy')") == [
            (filenode,)
        ]
        [(n, top)] = await fetch(pool, "SELECT count(*), max(audit_id) FROM commandbus.audit")
        assert (n, top) == (AUDIT_ROWS, max_id)
        # New rows continue the old ids, and queries by command use the attached index.
        bus = CommandBus(pool)
        cid = uuid4()
        await bus.send("orders", "X", cid, {})
        trail = await bus.get_audit_trail(cid, "orders")
        assert [e.event_type for e in trail] == ["SENT"] and trail[0].audit_id > max_id
        old = await bus.get_audit_trail(UUID("c4ca4238-a0b9-2382-0dcc-509a6f75849b"))
        assert len(old) == 10  # md5('1')
        plan = await fetch(
            pool,
            "EXPLAIN SELECT * FROM commandbus.audit WHERE command_id = %s",
            cid,
        )
        assert "audit_legacy_cmdid_ts" in " ".join(r[0] for r in plan)
        await bus.close()
        # Re-running every migration keeps it as it is.
        await setup_database(pool, skip_if_exists=False)
        after = await partitions(pool)
        assert {k: after[k] for k in parts} == parts
        [(n,)] = await fetch(pool, "SELECT count(*) FROM commandbus.audit")
        assert n == AUDIT_ROWS + 1
    finally:
        await pool.close()
    print(f"upgrade of {AUDIT_ROWS} audit rows ({source}): {took:.2f} s")


async def test_concurrent_pruners_drop_each_day_once(pool: AsyncConnectionPool[Any]) -> None:
    first = _today() - timedelta(days=10)
    await fetch(
        pool, "SELECT commandbus.ensure_audit_partitions_v1(%s, %s)", first, first + timedelta(4)
    )
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "X", cid, {})
    await fetch(pool, "UPDATE commandbus.command SET status = 'COMPLETED' RETURNING 1")
    await fetch(
        pool,
        "UPDATE commandbus.command SET created_at = %s, updated_at = %s RETURNING 1",
        datetime(first.year, first.month, first.day, 1, tzinfo=UTC),
        datetime(first.year, first.month, first.day, 2, tzinfo=UTC),
    )
    await fetch(pool, "UPDATE commandbus.audit SET ts = %s RETURNING 1",
                datetime(first.year, first.month, first.day, 1, tzinfo=UTC))  # fmt: skip
    results = await asyncio.gather(*(prune(pool, timedelta(days=1)) for _ in range(3)))
    assert sum(r.commands for r in results) == 1
    # A pruner that finds another one dropping leaves it to it: run once more to finish.
    results.append(await prune(pool, timedelta(days=1)))
    assert sum(r.partitions for r in results) == 5
    assert await events(pool, cid) == []
    names = await partitions(pool)
    assert not [
        n
        for n, (lo, _, _) in names.items()
        if lo is not None and lo.date() < _today() - timedelta(days=1)
    ]
    await bus.close()
