"""The command table partitioned by day (V006): rows by created_at, the hot path finding each
row in its own partition, command_ids reserved across partitions and across the turnover of
their reservations, retention by whole partitions that keeps every command still in use, and
the upgrade in place of a database holding many commands (attached, not rewritten)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from itest_helpers import fetch, status_of, wait_until
from psycopg_pool import AsyncConnectionPool
from test_setup import PREDECESSOR_SCHEMA

from commandbus import (
    BatchCommand,
    Command,
    CommandBus,
    DuplicateCommandError,
    HandlerContext,
    HandlerRegistry,
    RetryPolicy,
    SendRequest,
    Worker,
    _db,
    _sql,
    setup_database,
)
from commandbus.embedded import install_pgmq
from commandbus.retention import prune

FAST = RetryPolicy(max_attempts=3, backoff_schedule=[0])


def _today() -> date:
    return datetime.now(UTC).date()


def _noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


async def partitions(pool: AsyncConnectionPool[Any]) -> dict[str, tuple[Any, Any, bool]]:
    rows = await fetch(pool, "SELECT * FROM commandbus.day_partitions_v1('commandbus.command')")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def partition_of(pool: AsyncConnectionPool[Any], domain: str, command_id: UUID) -> str:
    [(name,)] = await fetch(
        pool,
        "SELECT tableoid::regclass::text FROM commandbus.command"
        " WHERE domain = %s AND command_id = %s",
        domain, command_id,
    )  # fmt: skip
    return str(name)


async def ensure_day(pool: AsyncConnectionPool[Any], day: date) -> None:
    await fetch(
        pool, "SELECT commandbus.ensure_day_partitions_v1('commandbus.command', %s, %s)", day, day
    )


async def store(
    pool: AsyncConnectionPool[Any],
    domain: str,
    command_id: UUID,
    status: str,
    at: datetime,
    batch_id: UUID | None = None,
) -> None:
    """A command row as a client writing its own rows stores it (repo_command_insert, with its
    created_at and updated_at), and, when PENDING, its queue message sent now."""
    msg_id = None
    if status == "PENDING":
        await fetch(pool, "SELECT commandbus.ensure_queue_v1(%s)", f"{domain}__commands")
        [(msg_id,)] = await fetch(
            pool,
            "SELECT pgmq.send(%s, jsonb_build_object('domain', %s::text, 'command_type', 'Ok',"
            " 'command_id', %s::text, 'data', '{}'::jsonb))",
            f"{domain}__commands", domain, str(command_id),
        )  # fmt: skip
    rows = await _db.fetch_all(
        pool,
        "repo_command_insert",
        [domain], [f"{domain}__commands"], [msg_id], [command_id], ["Ok"], [status], [0],
        [None], [None], [None], [at], [at], [batch_id],
    )  # fmt: skip
    assert [tuple(r) for r in rows] == [(command_id,)]


async def run_worker_until(pool: AsyncConnectionPool[Any], domain: str, done: list[UUID]) -> None:
    registry = HandlerRegistry()

    @registry.handler(domain, "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> dict[str, str]:
        return {"id": str(cmd.command_id)}

    worker = Worker(pool, domain, registry, retry_policy=FAST)
    task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
    try:

        async def all_done() -> bool:
            return all([await status_of(pool, domain, c) == "COMPLETED" for c in done])

        await wait_until(all_done)
    finally:
        await worker.stop(timeout=5)
        await task


async def test_commands_are_partitioned_by_day_and_run(pool: AsyncConnectionPool[Any]) -> None:
    """Day partitions from yesterday to a week ahead; a sent command lands in today's, and a
    worker claims and completes it there; a command stored three days ago (its partition made
    then) and sent again today (its message newer than its row: the claim's second pass) runs
    too, in its own partition."""
    [(kind,)] = await fetch(
        pool, "SELECT relkind FROM pg_class WHERE oid = 'commandbus.command'::regclass"
    )
    assert kind == "p"
    parts = await partitions(pool)
    today = _today()
    for k in range(-1, 8):
        day = today + timedelta(days=k)
        lo, hi, _ = parts[f"command_{day:%Y%m%d}"]
        assert lo == datetime(day.year, day.month, day.day, tzinfo=UTC)
        assert hi - lo == timedelta(days=1)
    assert parts["command_default"][2] is True
    assert "command_legacy" not in parts  # a new database

    bus = CommandBus(pool)
    new, old = uuid4(), uuid4()
    await bus.send("orders", "Ok", new, {})
    assert await partition_of(pool, "orders", new) == f"commandbus.command_{today:%Y%m%d}"
    day = today - timedelta(days=3)
    await ensure_day(pool, day)
    await store(pool, "orders", old, "PENDING", _noon(day))
    assert await partition_of(pool, "orders", old) == f"commandbus.command_{day:%Y%m%d}"
    await run_worker_until(pool, "orders", [new, old])
    for cid in (new, old):
        cmd = await bus.get_command("orders", cid)
        assert cmd is not None and cmd.attempts == 1 and cmd.result == {"id": str(cid)}
    await bus.close()


async def test_a_day_with_commands_in_the_default_partition_gets_none(
    pool: AsyncConnectionPool[Any],
) -> None:
    """A command stored on a day no partition covers waits in command_default; that day then
    gets no partition (moving the row could slip it from under a worker claiming it), and the
    command still runs there."""
    far = _today() - timedelta(days=20)
    cid = uuid4()
    await store(pool, "orders", cid, "PENDING", _noon(far))
    assert await partition_of(pool, "orders", cid) == "commandbus.command_default"
    [(made,)] = await fetch(
        pool,
        "SELECT commandbus.ensure_day_partitions_v1('commandbus.command', %s, %s)",
        far - timedelta(days=1), far + timedelta(days=1),
    )  # fmt: skip
    assert made == 2  # the days before and after
    assert f"command_{far:%Y%m%d}" not in await partitions(pool)
    assert await partition_of(pool, "orders", cid) == "commandbus.command_default"
    await run_worker_until(pool, "orders", [cid])


async def test_a_command_id_is_reserved_across_partitions(pool: AsyncConnectionPool[Any]) -> None:
    """An id stored in an older partition is a duplicate for a send today, by the engine's
    direct statement and by the function path (a batch), and for a client's own insert; two
    sends of one new id at once: exactly one wins."""
    bus = CommandBus(pool)
    day = _today() - timedelta(days=2)
    await ensure_day(pool, day)
    old = uuid4()
    await store(pool, "orders", old, "COMPLETED", _noon(day))
    with pytest.raises(DuplicateCommandError) as err:
        await bus.send("orders", "Ok", old, {})
    assert str(old) in str(err.value)
    with pytest.raises(DuplicateCommandError):
        await bus.create_batch("orders", [BatchCommand(command_type="Ok", command_id=old, data={})])
    # A client's own insert skips it (repo_command_insert returns the ids it stored).
    rows = await _db.fetch_all(
        pool,
        "repo_command_insert",
        ["orders"], ["orders__commands"], [None], [old], ["Ok"], ["PENDING"], [0],
        [None], [None], [None], [None], [None], [None],
    )  # fmt: skip
    assert rows == []
    # Another domain may use the same id.
    await bus.send("billing", "Ok", old, {})

    race = uuid4()
    results = await asyncio.gather(
        *(bus.send("orders", "Ok", race, {}) for _ in range(8)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, DuplicateCommandError) for r in errors)
    [(n,)] = await fetch(
        pool, "SELECT count(*) FROM commandbus.command WHERE command_id = %s", race
    )
    assert n == 1
    await bus.close()


async def _key_state(pool: AsyncConnectionPool[Any]) -> dict[int, datetime]:
    """When each generation of reservations was last emptied."""
    rows = await fetch(pool, "SELECT gen, emptied_at FROM commandbus.command_key_state")
    return {int(g): t for g, t in rows}


async def _rotate(pool: AsyncConnectionPool[Any]) -> bool:
    """Turn the reservations over as a prune whose cutoff is now would (when due)."""
    [(rotated,)] = await fetch(pool, "SELECT commandbus.rotate_command_keys_v1(clock_timestamp())")
    return bool(rotated)


async def test_reservations_turn_over_but_keep_stored_commands(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The reservations turn over only once the current generation is older than the cutoff;
    an id stays reserved while its command is stored (a pending one, kept by retention), and
    for one more turnover after its command was sent; a pruned command's id is free after two."""
    bus = CommandBus(pool)
    day = _today() - timedelta(days=5)
    await ensure_day(pool, day)
    pending, done, recent = uuid4(), uuid4(), uuid4()
    await store(pool, "orders", pending, "PENDING", _noon(day))
    await store(pool, "orders", done, "COMPLETED", _noon(day))
    await bus.send("orders", "Ok", recent, {})
    state0 = await _key_state(pool)

    # Not due: the generation emptied last was emptied after the cutoff.
    result = await prune(pool, timedelta(days=1))
    assert result.keys_rotated is False and await _key_state(pool) == state0
    assert await status_of(pool, "orders", done) is None  # pruned
    assert await _rotate(pool) is True
    state1 = await _key_state(pool)
    assert [g for g in (0, 1) if state1[g] != state0[g]] == [0]  # one emptied (a tie: gen 0)
    for cid in (pending, done, recent):  # still reserved in the other generation
        with pytest.raises(DuplicateCommandError):
            await bus.send("orders", "Ok", cid, {})

    assert await _rotate(pool) is True
    state2 = await _key_state(pool)
    assert state2[0] == state1[0] and state2[1] > state1[1]  # now the other one
    # `done` is pruned and was sent before the last two turnovers: its id is free again.
    # `pending` and `recent` are still stored: reserved again at the turnover.
    await bus.send("orders", "Ok", done, {})
    for cid in (pending, recent):
        with pytest.raises(DuplicateCommandError):
            await bus.send("orders", "Ok", cid, {})
    # The same at the next turnover, through a prune (a cutoff of now: due).
    result = await prune(pool, timedelta(0))
    assert result.keys_rotated is True
    for cid in (pending, recent, done):
        with pytest.raises(DuplicateCommandError):
            await bus.send("orders", "Ok", cid, {})
    await bus.close()


async def test_retention_drops_whole_days_and_keeps_what_is_in_use(
    pool: AsyncConnectionPool[Any],
) -> None:
    """Three old days: one of finished commands only (dropped whole), one with a pending
    command and one finished in an open batch among finished ones (kept; its other finished
    rows pruned one by one), and one shared by two domains (a prune of one domain keeps it and
    prunes that domain's rows; a prune of every domain drops it)."""
    bus = CommandBus(pool)
    today = _today()
    d_done, d_live, d_shared = (today - timedelta(days=k) for k in (6, 5, 4))
    for d in (d_done, d_live, d_shared):
        await ensure_day(pool, d)
    batch = uuid4()
    await fetch(pool, "INSERT INTO commandbus.batch (domain, batch_id) VALUES ('orders', %s)"
                " RETURNING 1", batch)  # fmt: skip
    finished = [uuid4() for _ in range(5)]
    for cid in finished:
        await store(pool, "orders", cid, "COMPLETED", _noon(d_done))
    live, in_batch, gone = uuid4(), uuid4(), uuid4()
    await store(pool, "orders", live, "PENDING", _noon(d_live))
    await store(pool, "orders", in_batch, "COMPLETED", _noon(d_live), batch_id=batch)
    await store(pool, "orders", gone, "FAILED", _noon(d_live))
    mine, theirs = uuid4(), uuid4()
    await store(pool, "orders", mine, "COMPLETED", _noon(d_shared))
    await store(pool, "billing", theirs, "COMPLETED", _noon(d_shared))
    recent = uuid4()
    await bus.send("orders", "Ok", recent, {})

    result = await prune(pool, timedelta(days=1), "orders")
    names = await partitions(pool)
    assert f"command_{d_done:%Y%m%d}" not in names
    assert f"command_{d_live:%Y%m%d}" in names and f"command_{d_shared:%Y%m%d}" in names
    assert result.command_partitions == 1
    assert result.command_partitions_kept == 2
    assert result.commands == 2  # `gone` and `mine`, row by row
    for cid in [*finished, gone, mine]:
        assert await status_of(pool, "orders", cid) is None
    assert await status_of(pool, "orders", live) == "PENDING"
    assert await status_of(pool, "orders", in_batch) == "COMPLETED"
    assert await status_of(pool, "orders", recent) == "PENDING"
    assert await status_of(pool, "billing", theirs) == "COMPLETED"

    # Every domain: the shared day goes whole; the day with live commands stays.
    result = await prune(pool, timedelta(days=1))
    names = await partitions(pool)
    assert f"command_{d_shared:%Y%m%d}" not in names and f"command_{d_live:%Y%m%d}" in names
    assert await status_of(pool, "billing", theirs) is None
    # The batch completes and the pending command finishes: its day goes too.
    await fetch(pool, "UPDATE commandbus.batch SET status = 'COMPLETED' RETURNING 1")
    await fetch(
        pool,
        "UPDATE commandbus.command SET status = 'COMPLETED', updated_at = %s"
        " WHERE command_id = %s RETURNING 1",
        _noon(d_live), live,
    )  # fmt: skip
    result = await prune(pool, timedelta(days=1))
    assert f"command_{d_live:%Y%m%d}" not in await partitions(pool)
    assert result.command_partitions == 1 and result.commands == 0
    assert await status_of(pool, "orders", recent) == "PENDING"
    await bus.close()


async def test_a_day_kept_for_the_tsq_or_a_batch_is_not_read_whole(
    pool: AsyncConnectionPool[Any],
) -> None:
    """Whether a day may go is asked at every prune: a day kept for a command in the TSQ or
    one of an open batch is found so through their indexes, without reading the partition
    (which an hourly retention would otherwise do again every hour for the same day); a day of
    finished commands only is read, and may go; a pending command keeps its day."""
    today = _today()
    d_tsq, d_batch, d_live, d_done = (today - timedelta(days=k) for k in (9, 8, 7, 6))
    for d in (d_tsq, d_batch, d_live, d_done):
        await ensure_day(pool, d)
    batch = uuid4()
    await fetch(pool, "INSERT INTO commandbus.batch (domain, batch_id) VALUES ('orders', %s)"
                " RETURNING 1", batch)  # fmt: skip
    for d in (d_tsq, d_batch, d_live, d_done):
        for _ in range(20):
            await store(pool, "orders", uuid4(), "COMPLETED", _noon(d))
    await store(pool, "orders", uuid4(), "IN_TROUBLESHOOTING_QUEUE", _noon(d_tsq))
    await store(pool, "orders", uuid4(), "COMPLETED", _noon(d_batch), batch_id=batch)
    await store(pool, "orders", uuid4(), "PENDING", _noon(d_live))
    cutoff = datetime.now(UTC) - timedelta(days=1)
    async with pool.connection() as conn, conn.transaction():
        for day, kept, read in (
            (d_tsq, True, False), (d_batch, True, False), (d_live, True, True),
            (d_done, False, True),
        ):  # fmt: skip
            name = f"command_{day:%Y%m%d}"
            before = await _xact_stat(conn, name, "seq_scan")
            cur = await conn.execute(
                "SELECT commandbus.command_partition_in_use_v1(%s, %s, NULL)", (name, cutoff)
            )
            assert (await cur.fetchone()) == (kept,), name
            assert (await _xact_stat(conn, name, "seq_scan") > before) == read, name


async def _xact_stat(conn: psycopg.AsyncConnection[Any], name: str, column: str) -> int:
    """A counter of pg_stat_xact_user_tables (seq_scan, idx_tup_fetch) for a partition: what this
    backend counted and has not reported yet (the current transaction's, and earlier ones'
    still pending)."""
    cur = await conn.execute(
        f"SELECT {column} FROM pg_stat_xact_user_tables"  # (a column name of this file's own)
        " WHERE schemaname = 'commandbus' AND relname = %s", (name,),
    )  # fmt: skip
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_a_claim_reads_its_own_commands_not_their_whole_send(
    pool: AsyncConnectionPool[Any],
) -> None:
    """Commands sent together share their created_at (one transaction's now()). With the
    day's statistics taken before they were sent, the planner prices an equality on created_at
    at one row; the claim and the flush must still find each row by its (domain, command_id),
    not read the whole send through the created_at index for every batch of 16 (they did: 10,000
    rows per claim of 64 after a send_batch of 10,000, on PostgreSQL 15)."""
    bus = CommandBus(pool)
    await bus.send("orders", "Ok", uuid4(), {})  # the queue, and rows to take statistics of
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO commandbus.command (domain, queue_name, command_id, command_type, status,"
            " attempts, created_at, updated_at)"
            " SELECT 'orders', 'orders__commands', gen_random_uuid(), 'Ok', 'COMPLETED', 1, t, t"
            " FROM generate_series(date_trunc('day', now(), 'UTC'), now(), interval '1 second')"
            " AS g(t) LIMIT 2000"
        )
        await conn.execute("ANALYZE commandbus.command")
    await bus.send_batch([SendRequest("orders", "Ok", uuid4(), {"n": k}) for k in range(1000)])
    part = f"command_{_today():%Y%m%d}"
    lease, claim = _sql.statement("lease_messages"), _sql.statement("claim_leased")
    complete = _sql.statement("complete_commands")
    async with pool.connection() as conn, conn.transaction():
        cur = psycopg.AsyncRawCursor(conn)
        before = await _xact_stat(conn, part, "idx_tup_fetch")
        await cur.execute(lease, ("orders", 30, 16))
        ids = (await cur.fetchone())[0]  # type: ignore[index]
        await cur.execute(claim, ("orders", ids, 3))
        rows = await cur.fetchall()
        assert len(rows) == 16
        claimed = await _xact_stat(conn, part, "idx_tup_fetch")
        leases = ([r[3] for r in rows], [r[0] for r in rows], [r[1] for r in rows])
        await cur.execute(complete, ("orders", *leases, [None] * 16, [r[9] for r in rows]))
        assert len(await cur.fetchall()) == 16
        flushed = await _xact_stat(conn, part, "idx_tup_fetch")
    assert claimed - before < 100, claimed - before
    assert flushed - claimed < 100, flushed - claimed
    await bus.close()


async def test_finished_commands_go_by_whole_days(pool: AsyncConnectionPool[Any]) -> None:
    """A cutoff of now: yesterday's finished command goes with its day's partition; one
    finished today stays until its day has ended before the cutoff (row by row deletes of each
    hour as the cutoff passes it would empty every partition before it could be dropped)."""
    yesterday = _today() - timedelta(days=1)
    old, new = uuid4(), uuid4()
    await store(pool, "orders", old, "COMPLETED", _noon(yesterday))
    await store(pool, "orders", new, "COMPLETED", datetime.now(UTC) - timedelta(seconds=1))
    result = await prune(pool, timedelta(0))
    assert f"command_{yesterday:%Y%m%d}" not in await partitions(pool)
    assert result.command_partitions == 1 and result.commands == 0
    assert await status_of(pool, "orders", old) is None
    assert await status_of(pool, "orders", new) == "COMPLETED"


async def test_a_client_from_before_the_partitions_still_flushes(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The flush functions called without created_at (a client from before V006) look the rows
    up in every partition and apply the outcomes as before."""
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "Ok", cid, {})
    [(msg_id,)] = await fetch(
        pool,
        "SELECT unnest(commandbus.lease_messages_v1('orders', 30, 10, false))",
    )
    claimed = await fetch(
        pool, "SELECT command_id, attempt FROM commandbus.claim_leased_v1('orders', %s, 3)",
        [msg_id],
    )  # fmt: skip
    assert claimed == [(cid, 1)]
    rows = await fetch(
        pool,
        "SELECT * FROM commandbus.complete_commands_v1('orders', %s, %s, %s, %s)",
        [cid], [msg_id], [1], ['{"old": true}'],
    )  # fmt: skip
    assert rows == [(cid, "COMPLETED")]
    cmd = await bus.get_command("orders", cid)
    assert cmd is not None and cmd.result == {"old": True}
    await bus.close()


COMMANDS = 200_000


@pytest.mark.parametrize("source", ["predecessor", "previous"])
async def test_upgrade_attaches_the_old_command_table(empty_db: str, source: str) -> None:
    """A reliable-cmd 0.2.2 database, or one of our schema before V006, with COMMANDS finished
    commands and one pending: setup_database() attaches the table as the oldest partition, same
    file (no rewrite); every stored id stays reserved; the pending command runs."""
    install_pgmq(empty_db)
    pending = uuid4()
    with psycopg.connect(empty_db, autocommit=True) as conn:
        if source == "predecessor":
            conn.execute(PREDECESSOR_SCHEMA)  # type: ignore[arg-type]
        else:
            for version, _, text in _sql.migrations():
                if version < 6:
                    conn.execute(text)  # type: ignore[arg-type]
        conn.execute(
            "INSERT INTO commandbus.command (domain, queue_name, command_id, command_type,"
            " status, attempts, max_attempts, created_at, updated_at)"
            " SELECT 'orders', 'orders__commands', md5('c' || g)::uuid, 'Ok', 'COMPLETED', 1, 3,"
            "        now() - (g::float8 / %s) * interval '20 days',"
            "        now() - (g::float8 / %s) * interval '20 days'"
            " FROM generate_series(1, %s) AS g",
            (COMMANDS, COMMANDS, COMMANDS),
        )
        conn.execute("SELECT pgmq.create('orders__commands')")
        conn.execute(
            "WITH m AS (SELECT pgmq.send('orders__commands', jsonb_build_object("
            " 'domain', 'orders', 'command_type', 'Ok', 'command_id', %s::text, 'data', '{}'))"
            " AS id)"
            " INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id,"
            " command_type, status, attempts, max_attempts) SELECT 'orders', 'orders__commands',"
            " m.id, %s, 'Ok', 'PENDING', 0, 3 FROM m",
            (str(pending), pending),
        )
        row = conn.execute(
            "SELECT pg_relation_filenode('commandbus.command'), count(*) FROM commandbus.command"
        ).fetchone()
        assert row is not None
        filenode, stored = row
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(empty_db, min_size=1, open=False)
    await pool.open()
    try:
        started = time.monotonic()
        await setup_database(pool)
        took = time.monotonic() - started
        parts = await partitions(pool)
        lo, hi, _ = parts["command_legacy"]
        assert lo is None and hi > datetime.now(UTC)
        if source == "previous":
            # (A predecessor's table is rewritten once by V001, which adds in_tsq; V006 not.)
            assert await fetch(
                pool, "SELECT pg_relation_filenode('commandbus.command_legacy')"
            ) == [(filenode,)]
        [(n,)] = await fetch(pool, "SELECT count(*) FROM commandbus.command")
        assert n == stored >= COMMANDS + 1
        bus = CommandBus(pool)
        with pytest.raises(DuplicateCommandError):
            await bus.send("orders", "Ok", UUID(bytes=bytes.fromhex(_md5("c7"))), {})
        await run_worker_until(pool, "orders", [pending])
        # Re-running every migration keeps it as it is.
        await setup_database(pool, skip_if_exists=False)
        assert await partitions(pool) == parts
        # Retention drops the old commands (the legacy partition and the days after it).
        # (A cutoff after the legacy partition's end: tomorrow.)
        result = await prune(pool, datetime.now(UTC) + timedelta(days=2))
        assert "command_legacy" not in await partitions(pool)
        assert result.command_partitions >= 1
        [(n,)] = await fetch(pool, "SELECT count(*) FROM commandbus.command")
        assert n == 0
        await bus.close()
    finally:
        await pool.close()
    print(f"upgrade of {COMMANDS} commands ({source}): {took:.2f} s")


def _md5(text: str) -> str:
    import hashlib

    return hashlib.md5(text.encode()).hexdigest()
