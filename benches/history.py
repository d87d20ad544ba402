"""History benchmark: worker throughput and retention with a large history (issue 16).

One run, one server (default: the machine's PostgreSQL at 127.0.0.1:5432; `--dsn` for another):

1. `ours` database (this checkout's schema, commands and audit partitioned by day): history
   generated set-based (generate_series, not through the bus): `--history` finished commands
   spread over `--history-days` past days, their ids reserved (command_key), three audit rows
   each (SENT, STARTED, COMPLETED), in each day's partitions, then vacuumed and analysed. Sizes
   of tables and indexes.
2. Worker throughput without history (a fresh database of the same server) and with it, in
   turns, `--repeat` pairs: a backlog of `--commands` PENDING commands (made set-based through
   send_commands_v2, then a CHECKPOINT) drained by one in-process `Worker` (no-op handler,
   `--concurrency`); the pairs alternate which database goes first. The ratio of the medians,
   each pair's ratio and their geometric mean; per run the server's CPU and page writes per
   command during the drain, the mean number of relation locks outside the fast path, of
   backends waiting on the lock manager and of active backends (sampled every 0.5 s), and the
   backlog's send rate.
3. Retention of the oldest day while the worker drains a backlog: the worker's rate in turns of
   `--window` seconds with retention running and without it (same drain; a turn with retention
   lasts at least `--window` seconds, however soon retention ends), retention's time and
   database CPU; again paced (`--duty`) on the next day.
4. `today` database: this checkout's schema in the layout before partitions (the setting
   `commandbus.unpartitioned`, V006) with one day of the same history (`--history /
   --history-days` commands), and the same measure with the retention that layout had
   (prune_v1, chunked DELETE of command, audit rows and messages).
5. A week of simulated days on `ours`: each day adds a day of history and prunes the oldest
   one. Sizes after it.

Databases are dropped at the end (`--keep` keeps them). Prints a JSON summary, and `--out FILE`
writes it. Development scale: `--history 200000 --history-days 4 --commands 20000 --week 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _client import PgCpu

from commandbus import (
    Command,
    HandlerContext,
    HandlerRegistry,
    Worker,
)
from commandbus.embedded import create_database, drop_database
from commandbus.retention import _prune
from commandbus.setup import setup_database

DOMAIN = "bench"
QUEUE = f"{DOMAIN}__commands"
DAY0 = datetime(2026, 1, 1, tzinfo=UTC)  # the first day of generated history


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _postmaster_of(conn: psycopg.Connection[Any]) -> int | None:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    fields = PgCpu.stat_fields(row[0]) if row else None
    return int(fields[1]) if fields else None


def _backend_cpu(pid: int) -> float | None:
    """CPU seconds of one server process (a backend), when it runs on this machine."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


# The command ids of the backlogs (--ids): random (uuid4, as the seed README's examples make
# them) or time-ordered (UUID version 7, commandbus.uuid7): a random id lands anywhere in the
# command table's unique index, a time-ordered one next to the ids sent just before it.
NEW_ID = {
    "uuid4": "gen_random_uuid()",
    "uuid7": "(lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')"
    " || '7' || substr(md5(random()::text), 1, 3) || 'a' || substr(md5(random()::text), 1, 15))"
    "::uuid",
}
IDS = "uuid4"


def _backlog(dsn: str, n: int) -> None:
    """n PENDING commands with their queue messages and SENT rows, 10,000 per call."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = 0
        while done < n:
            k = min(10_000, n - done)
            conn.execute(
                "WITH a AS (SELECT array_agg(id) AS ids, array_agg(jsonb_build_object("
                "  'domain', %(d)s::text, 'command_type', 'Noop', 'command_id', id,"
                "  'correlation_id', id, 'data', jsonb_build_object('n', 1))) AS msgs"
                f"  FROM (SELECT {NEW_ID[IDS]} AS id FROM generate_series(1, %(k)s)) g)"
                " SELECT count(*) FROM a, commandbus.send_commands_v2(%(d)s, a.ids,"
                " array_fill('Noop'::text, ARRAY[%(k)s]), a.msgs,"
                " array_fill(NULL::uuid, ARRAY[%(k)s]), array_fill(NULL::text, ARRAY[%(k)s]),"
                " array_fill(NULL::int, ARRAY[%(k)s]), array_fill(NULL::uuid, ARRAY[%(k)s]))",
                {"d": DOMAIN, "k": k},
            )
            done += k


def _history_day(conn: psycopg.Connection[Any], day: datetime, n: int, tag: str) -> None:
    """n COMPLETED commands created over `day`, each with SENT, STARTED and COMPLETED rows."""
    step = 86_400.0 / n
    chunk = 500_000
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        conn.execute(
            """
            WITH c AS (
                INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id,
                    command_type, status, attempts, created_at, updated_at, reply_queue, result)
                SELECT %(d)s, %(q)s, NULL, md5(%(tag)s || g)::uuid, 'Noop', 'COMPLETED', 1,
                       %(day)s + g * %(step)s * interval '1 second',
                       %(day)s + (g * %(step)s + 0.05) * interval '1 second', '', NULL
                FROM generate_series(%(lo)s, %(hi)s - 1) AS g
                RETURNING command_id, created_at
            ), k0 AS (
                INSERT INTO commandbus.command_key_0 (domain, command_id)
                SELECT %(d)s, c.command_id FROM c
            ), k1 AS (
                INSERT INTO commandbus.command_key_1 (domain, command_id)
                SELECT %(d)s, c.command_id FROM c
            )
            INSERT INTO commandbus.audit (domain, command_id, event_type, ts, details_json)
            SELECT %(d)s, c.command_id, e.event_type, c.created_at + e.offs,
                   CASE e.event_type WHEN 'SENT' THEN jsonb_build_object('command_type', 'Noop',
                       'correlation_id', NULL, 'reply_to', NULL, 'msg_id', 1, 'batch_id', NULL)
                   WHEN 'STARTED' THEN jsonb_build_object('attempt', 1, 'msg_id', 1)
                   ELSE jsonb_build_object('msg_id', 1, 'reply_to', NULL) END
            FROM c CROSS JOIN (VALUES ('SENT', interval '0'), ('STARTED', interval '10 ms'),
                                      ('COMPLETED', interval '50 ms')) AS e(event_type, offs)
            """,
            {"d": DOMAIN, "q": QUEUE, "tag": tag, "day": day, "step": step, "lo": lo, "hi": hi},
        )


def _dsn_of(admin: str, name: str) -> str:
    """The DSN of database `name` on the server of `admin`."""
    params = psycopg.conninfo.conninfo_to_dict(admin)
    params["dbname"] = name
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def _top_up(dsn: str, days: int, per_day: int) -> float:
    """Generate what is missing of `per_day` commands on each of the first `days` days."""
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for k in range(days):
            day = DAY0 + timedelta(days=k)
            row = conn.execute(
                "SELECT count(*) FROM commandbus.command WHERE created_at >= %s"
                " AND created_at < %s", (day, day + timedelta(days=1)),
            ).fetchone()  # fmt: skip
            missing = per_day - (row[0] if row else 0)
            if missing > 0:
                _log(f"history day {day.date()}: {missing} commands")
                _history_day(conn, day, missing, f"r{k}-")
        conn.execute("VACUUM ANALYZE commandbus.command")
        conn.execute("VACUUM ANALYZE commandbus.audit")
        # (the reservations too: else autovacuum works through them during the pairs)
        conn.execute("VACUUM ANALYZE commandbus.command_key_0, commandbus.command_key_1")
    return time.monotonic() - t0


def _show(dsn: str, setting: str) -> str | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SHOW {setting}".encode()).fetchone()
    return str(row[0]) if row else None


def _io(dsn: str) -> dict[str, float]:
    """The server's WAL written so far (full-page images, bytes) and the database's block reads
    (from outside PostgreSQL's buffers) and hits; after a pause, so that the backends of the
    run just ended have reported theirs."""
    time.sleep(1.5)
    with psycopg.connect(dsn, autocommit=True) as conn:
        wal = conn.execute("SELECT wal_fpi, wal_bytes FROM pg_stat_wal").fetchone()
        blks = conn.execute(
            "SELECT blks_read, blks_hit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert wal is not None and blks is not None
    return {"wal_fpi": wal[0], "wal_bytes": float(wal[1]), "read": blks[0], "hit": blks[1]}


def _io_per_command(a: dict[str, float], b: dict[str, float], n: int) -> dict[str, float]:
    """Per command of a rate run (its backlog's insert and its drain): full-page images and
    bytes of WAL, blocks read from outside PostgreSQL's buffers, and blocks found in them."""
    return {k: round((b[k] - a[k]) / n, 2) for k in a}


def _sizes(dsn: str) -> dict[str, dict[str, int]]:
    """Heap and index bytes of the command and audit tables (all partitions), the command_id
    reservations, payload_archive and the queue tables."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            r"""
            SELECT CASE WHEN n.nspname = 'pgmq' THEN 'pgmq'
                        WHEN c.relname LIKE 'audit%%' THEN 'audit'
                        WHEN c.relname LIKE 'command\_key%%' THEN 'command_key'
                        WHEN c.relname LIKE 'command%%' THEN 'command' ELSE c.relname END AS t,
                   sum(pg_table_size(c.oid))::bigint, sum(pg_indexes_size(c.oid))::bigint,
                   sum(greatest(c.reltuples, 0))::bigint
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND (n.nspname = 'pgmq' OR (n.nspname = 'commandbus'
                  AND c.relname IN ('payload_archive', 'batch')
                  OR n.nspname = 'commandbus' AND c.relname LIKE 'audit%%'
                  OR n.nspname = 'commandbus' AND c.relname LIKE 'command%%'))
            GROUP BY 1 ORDER BY 1
            """
        ).fetchall()
    return {r[0]: {"table": r[1], "indexes": r[2], "est_rows": r[3]} for r in rows}


class _Counter:
    handled = 0


async def _noop(command: Command, context: HandlerContext) -> None:
    _Counter.handled += 1


class Drain:
    """A worker draining the backlog; `rate(a, b)`: handled per second between two marks."""

    def __init__(self, dsn: str, concurrency: int, feed: int = 0) -> None:
        self.dsn = dsn
        self.concurrency = concurrency
        self.feed = feed  # keep at least this many commands pending (0: no feeding)
        self.sent = 0
        self.samples: list[tuple[float, int]] = []

    async def __aenter__(self) -> Drain:
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.dsn, min_size=2, max_size=10, open=False
        )
        await self.pool.open()
        registry = HandlerRegistry()
        registry.register(DOMAIN, "Noop", _noop)
        self.worker = Worker(self.pool, DOMAIN, registry)
        _Counter.handled = 0
        self.task = asyncio.create_task(
            self.worker.run(concurrency=self.concurrency, poll_interval=0.2)
        )
        self.sampler = asyncio.create_task(self._sample())
        self.feeder = asyncio.create_task(self._feed()) if self.feed else None
        return self

    async def _feed(self) -> None:
        while True:
            if self.sent - _Counter.handled < self.feed:
                await asyncio.to_thread(_backlog, self.dsn, 10_000)
                self.sent += 10_000
            else:
                await asyncio.sleep(0.1)

    async def _sample(self) -> None:
        while True:
            self.samples.append((time.monotonic(), _Counter.handled))
            await asyncio.sleep(0.25)

    def mark(self) -> tuple[float, int]:
        return time.monotonic(), _Counter.handled

    async def wait_handled(self, n: int, stall: float = 120) -> None:
        last, since = _Counter.handled, time.monotonic()
        while _Counter.handled < n:
            await asyncio.sleep(0.05)
            if _Counter.handled != last:
                last, since = _Counter.handled, time.monotonic()
            elif time.monotonic() - since > stall:
                raise RuntimeError(f"worker stalled at {last} of {n} handled")

    async def __aexit__(self, *exc: object) -> None:
        self.sampler.cancel()
        if self.feeder is not None:
            self.feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.feeder
        await self.worker.stop(timeout=30)
        await self.task
        await self.pool.close()


def _rate(a: tuple[float, int], b: tuple[float, int]) -> float:
    return (b[1] - a[1]) / max(1e-9, b[0] - a[0])


def _writes(dsn: str) -> dict[str, float]:
    """The server's buffer writes so far: by the checkpointer, the background writer and the
    backends themselves (each an 8 kB page): pg_stat_bgwriter before PostgreSQL 17,
    pg_stat_checkpointer and pg_stat_io since."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.info.server_version
        query = (
            "SELECT buffers_checkpoint, buffers_clean, buffers_backend FROM pg_stat_bgwriter"
            if version < 170000
            else "SELECT (SELECT buffers_written FROM pg_stat_checkpointer),"
            " (SELECT buffers_clean FROM pg_stat_bgwriter),"
            " (SELECT coalesce(sum(writes), 0)::bigint FROM pg_stat_io"
            "   WHERE backend_type = 'client backend')"
        )
        row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return {"checkpoint": row[0], "clean": row[1], "backend": row[2]}


async def _lock_sampler(dsn: str, into: list[tuple[int, int, int]]) -> None:
    """Every 0.5 s: the database's relation locks held outside the backends' fast-path slots
    (PostgreSQL before 18 has 16 per backend; each further one goes through the shared lock
    table), the backends waiting on the lock manager, and the active ones."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM pg_locks l WHERE l.locktype = 'relation'"
                "          AND NOT l.fastpath AND l.database = d.oid),"
                "       (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid"
                "          AND a.wait_event = 'LockManager'),"
                "       (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid"
                "          AND a.state = 'active' AND a.pid <> pg_backend_pid())"
                " FROM pg_database d WHERE d.datname = current_database()"
            )
            row = await cur.fetchone()
            if row is not None:
                into.append((int(row[0]), int(row[1]), int(row[2])))
            await asyncio.sleep(0.5)


async def _throughput(
    dsn: str, n: int, concurrency: int, cpu: PgCpu, checkpoint: bool = True
) -> dict[str, float]:
    """Draining a fresh backlog of n: commands per second (first 10% left out: warm-up), the
    server's CPU per command (microseconds, all its processes) and its page writes per command
    over the same span; and the backlog's own send rate. A CHECKPOINT between the backlog and
    the drain writes the pages the sends dirtied (with history, the reservations' random-id
    index pages): the drain measures the worker, not the write-back of its setup. The send
    rate is reported beside it, so what history costs the send is not hidden."""
    t0 = time.monotonic()
    _backlog(dsn, n)
    send_rate = n / (time.monotonic() - t0)
    if checkpoint:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    locks: list[tuple[int, int, int]] = []
    async with Drain(dsn, concurrency) as drain:
        await drain.wait_handled(n // 10)
        a, cpu0, w0 = drain.mark(), cpu.sample(), _writes(dsn)
        sampler = asyncio.create_task(_lock_sampler(dsn, locks))
        await drain.wait_handled(n)
        b, cpu1, w1 = drain.mark(), cpu.sample(), _writes(dsn)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    done = b[1] - a[1]
    out = {"rate": _rate(a, b), "send_rate": send_rate}
    if locks:
        out["slow_path_locks"] = statistics.mean(x[0] for x in locks)
        out["lock_manager_waits"] = statistics.mean(x[1] for x in locks)
        out["active_backends"] = statistics.mean(x[2] for x in locks)
    if cpu0 is not None and cpu1 is not None:
        out["pg_cpu_us"] = (cpu1 - cpu0) * 1e6 / done
    out.update({f"writes_{k}": (w1[k] - w0[k]) / done for k in w0})
    return {k: round(v, 3) for k, v in out.items()}


async def _retention_under_load(
    dsn: str, backlog: int, concurrency: int, cpu: PgCpu, run: Any, window: float
) -> dict[str, Any]:
    """The worker's rate with retention running against without it, in turns: windows of
    `window` seconds without retention and with it (`run(stop)`: a coroutine that prunes until
    `stop` is set and returns (finished, detail); its turn lasts a window even when it returns
    sooner), until retention has finished, and one more
    window without; at least `backlog` commands kept pending by a feeder (sending is part of
    the load). Turns, not a window before against the run after it: the rate drifts on its own
    as the tables grow and autovacuum comes and goes, and that drift is not retention's."""
    loop = asyncio.get_running_loop()
    on = [0.0, 0]  # seconds, commands handled
    off = [0.0, 0]
    pairs: list[float] = []
    details: list[dict[str, Any]] = []
    db_cpu = 0.0
    run_s = 0.0

    async def off_window() -> float:
        a = drain.mark()
        await asyncio.sleep(window)
        b = drain.mark()
        off[0] += b[0] - a[0]
        off[1] += b[1] - a[1]
        return _rate(a, b)

    async with Drain(dsn, concurrency, feed=backlog) as drain:
        await drain.wait_handled(20_000)
        finished = False
        while not finished:
            rate_off = await off_window()
            stop = asyncio.Event()
            timer = loop.call_later(window, stop.set)
            cpu0, a = cpu.sample(), drain.mark()
            t0 = time.monotonic()
            finished, detail = await run(stop)
            took = time.monotonic() - t0
            run_s += took
            cpu1 = cpu.sample()
            # A turn with retention lasts a window however soon it ends (a partition drop
            # takes a second), so that the rates compare like with like.
            await asyncio.sleep(max(0.0, window - took))
            b = drain.mark()
            timer.cancel()
            on[0] += b[0] - a[0]
            on[1] += b[1] - a[1]
            if cpu0 is not None and cpu1 is not None:
                db_cpu += cpu1 - cpu0
            details.append(detail)
            if b[0] - a[0] >= window / 2:  # a last short turn says little
                pairs.append(_rate(a, b) / max(1e-9, rate_off))
        await off_window()
        left = drain.sent - drain.mark()[1]
    total: dict[str, Any] = {}
    for d in details:
        for k, v in d.items():
            total[k] = round(total.get(k, 0) + v, 2) if isinstance(v, int | float) else v
    rate_on, rate_off = on[1] / max(1e-9, on[0]), off[1] / max(1e-9, off[0])
    return {
        "rate_without": round(rate_off),
        "rate_during": round(rate_on),
        "ratio": round(rate_on / max(1e-9, rate_off), 3),
        "turn_ratios": [round(x, 3) for x in pairs],
        "retention_s": round(run_s, 2),
        "windows_with_retention_s": round(on[0], 2),
        "db_cpu_s": round(db_cpu, 2),
        "pending_at_end": left,
        "detail": total,
    }


def _generate(dsn: str, first_day: int, days: int, per_day: int, tag: str) -> float:
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for k in range(first_day, first_day + days):
            day = DAY0 + timedelta(days=k)
            _log(f"history day {day.date()}: {per_day} commands")
            _history_day(conn, day, per_day, f"{tag}-{k}-")
        conn.execute("VACUUM ANALYZE commandbus.command")
        conn.execute("VACUUM ANALYZE commandbus.audit")
        # (the reservations too: else autovacuum works through them during the pairs)
        conn.execute("VACUUM ANALYZE commandbus.command_key_0, commandbus.command_key_1")
    return time.monotonic() - t0


async def main(args: argparse.Namespace) -> dict[str, Any]:
    global IDS
    IDS = args.ids
    admin = args.dsn
    run_id = uuid4().hex[:6]
    ours = args.reuse or f"rcmd_hist_ours_{run_id}"
    today, fresh = f"rcmd_hist_today_{run_id}", f"rcmd_hist_fresh_{run_id}"
    per_day = args.history // args.history_days
    out: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }

    def save() -> None:
        """The figures so far (a run cut short keeps what it measured)."""
        if args.out:
            args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")

    with psycopg.connect(admin, autocommit=True) as conn:
        out["server"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        out["autovacuum"] = conn.execute("SHOW autovacuum").fetchone()[0]  # type: ignore[index]
        naptime = conn.execute("SHOW autovacuum_naptime").fetchone()
        out["autovacuum_naptime"] = naptime[0] if naptime else None
        if out["autovacuum"] != "on":
            # Without it the load phases' dead rows (every command claimed and finished, every
            # queue message deleted) pile up, and the worker's rate falls with them, history
            # or not: the figures then measure that, not history.
            _log("WARNING: autovacuum is off on this server: the rates measure the dead rows")
        cpu = PgCpu(_postmaster_of(conn))
    ours_dsn = create_database(admin, ours) if not args.reuse else _dsn_of(admin, args.reuse)
    try:
        async with AsyncConnectionPool(ours_dsn, min_size=1, max_size=4, open=False) as pool:
            # With --reuse: every migration again (the functions as this checkout has them).
            await setup_database(pool, skip_if_exists=not args.reuse)
            async with pool.connection() as aconn:
                await aconn.execute(f"SELECT commandbus.ensure_queue_v1('{QUEUE}')")
                # Day partitions of the generated history (and of the simulated week).
                await aconn.execute(
                    "SELECT commandbus.ensure_day_partitions_v1(t, %s::date, %s::date)"
                    " FROM unnest(ARRAY['commandbus.audit', 'commandbus.command']::regclass[]) t",
                    (DAY0.date(), (DAY0 + timedelta(days=args.history_days + args.week)).date()),
                )
                if args.reuse:
                    # The rows earlier runs' load phases left (in the partitions of the days
                    # they ran on, after the generated and simulated days): the pairs compare
                    # the history with a fresh database, not with what earlier pairs sent today.
                    cur = await aconn.execute(
                        "SELECT p.partition_name FROM unnest(ARRAY['commandbus.audit',"
                        " 'commandbus.command']::regclass[]) t,"
                        " commandbus.day_partitions_v1(t) p WHERE p.range_from >= %s",
                        (DAY0 + timedelta(days=args.history_days + args.week + 1),),
                    )
                    for (name,) in await cur.fetchall():
                        _log(f"reuse: emptying {name} (rows of earlier runs' load phases)")
                        await aconn.execute(f'TRUNCATE commandbus."{name}"'.encode())
        # No history: a fresh database of the same server, measured in turns with the one
        # holding the history (each pair of runs under the same machine load), after the
        # history is generated and vacuumed (steady state: autovacuum is not busy with it).
        fresh_dsn = create_database(admin, fresh)
        async with AsyncConnectionPool(fresh_dsn, min_size=1, max_size=2, open=False) as p:
            await setup_database(p)
            async with p.connection() as aconn:
                await aconn.execute(f"SELECT commandbus.ensure_queue_v1('{QUEUE}')")
        out["sizes_empty"] = _sizes(fresh_dsn)
        _log(f"ours: generating {args.history} commands of history (days missing)")
        out["generate_s"] = round(_top_up(ours_dsn, args.history_days, per_day), 1)
        out["sizes_history"] = _sizes(ours_dsn)
        save()
        base: list[float] = []
        hist: list[float] = []
        runs: dict[str, list[dict[str, float]]] = {"no_history": [], "history": []}
        io: dict[str, list[dict[str, float]]] = {"no_history": [], "history": []}
        for k in range(args.repeat):
            _log(f"throughput without history / with history, pair {k + 1}/{args.repeat}")
            order = [(fresh_dsn, base, "no_history"), (ours_dsn, hist, "history")]
            for dsn, rates, key in order if k % 2 == 0 else order[::-1]:  # ABBA: no order bias
                before = _io(dsn)
                run = await _throughput(
                    dsn, args.commands, args.concurrency, cpu, not args.no_checkpoint
                )
                rates.append(run["rate"])
                runs[key].append(run)
                io[key].append(_io_per_command(before, _io(dsn), args.commands))
            _log(f"  {round(base[-1])} / {round(hist[-1])} commands/s; {runs}; {io}")
        drop_database(admin, fresh)
        out["shared_buffers"] = _show(admin, "shared_buffers")
        out["throughput_io_per_command"] = io
        out["throughput_runs"] = runs
        out["throughput_no_history"] = round(statistics.median(base))
        out["throughput_no_history_runs"] = [round(b) for b in base]
        out["throughput_history"] = round(statistics.median(hist))
        out["throughput_history_runs"] = [round(h) for h in hist]
        out["throughput_ratio"] = round(statistics.median(hist) / statistics.median(base), 3)
        out["throughput_pair_ratios"] = [round(h / b, 3) for h, b in zip(hist, base, strict=True)]
        out["throughput_pair_ratio_geomean"] = round(
            statistics.geometric_mean([h / b for h, b in zip(hist, base, strict=True)]), 3
        )
        save()
        if args.throughput_only:
            return out

        async def ours_retention(
            cutoff: datetime, duty: float = 1.0, stop: asyncio.Event | None = None
        ) -> tuple[bool, dict[str, Any]]:
            async with AsyncConnectionPool(ours_dsn, min_size=1, max_size=1, open=False) as p:
                async with p.connection() as c:
                    pid = (await (await c.execute("SELECT pg_backend_pid()")).fetchone())[0]  # type: ignore[index]
                cpu0 = _backend_cpu(pid)
                r = await _prune(p, cutoff, None, args.chunk, None, stop, duty)
                cpu1 = _backend_cpu(pid)
            return stop is None or not stop.is_set(), {
                "backend_cpu_s": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
                "command_partitions": r.command_partitions,
                "command_partition_rows": r.command_partition_rows,
                "command_partitions_kept": r.command_partitions_kept,
                "commands": r.commands, "partitions": r.partitions,
                "partition_rows": r.partition_rows, "messages": r.messages,
                "kept": r.partitions_kept}  # fmt: skip

        _log("ours: retention of the oldest day under load")
        cutoff = DAY0 + timedelta(days=1, hours=1)
        out["retention_ours"] = await _retention_under_load(
            ours_dsn, args.backlog, args.concurrency, cpu,
            lambda stop: ours_retention(cutoff, stop=stop), args.window,
        )  # fmt: skip
        out["sizes_after_retention"] = _sizes(ours_dsn)
        save()
        _log(f"ours: paced retention (max_duty {args.duty}) of the next day under load")
        cutoff2 = DAY0 + timedelta(days=2, hours=1)
        out["retention_ours_paced"] = await _retention_under_load(
            ours_dsn, args.backlog, args.concurrency, cpu,
            lambda stop: ours_retention(cutoff2, args.duty, stop), args.window,
        )  # fmt: skip
        save()

        # today: the layout before partitions, one day of the same history
        today_dsn = create_database(admin, today)
        unpartitioned = psycopg.conninfo.make_conninfo(
            today_dsn, options="-c commandbus.unpartitioned=on"
        )
        async with AsyncConnectionPool(unpartitioned, min_size=1, max_size=1, open=False) as p:
            await setup_database(p)
            async with p.connection() as aconn:
                await aconn.execute(f"SELECT commandbus.ensure_queue_v1('{QUEUE}')")
        _log(f"today: generating {per_day} commands of history")
        _generate(today_dsn, 0, 1, per_day, "t")
        out["sizes_today_history"] = _sizes(today_dsn)

        async def today_retention(
            cutoff: datetime, stop: asyncio.Event
        ) -> tuple[bool, dict[str, Any]]:
            totals = {"commands": 0, "audit_events": 0, "messages": 0, "chunks": 0}
            async with await psycopg.AsyncConnection.connect(today_dsn, autocommit=True) as c:
                pid = (await (await c.execute("SELECT pg_backend_pid()")).fetchone())[0]  # type: ignore[index]
                cpu0 = _backend_cpu(pid)
                finished = False
                while not stop.is_set():
                    cur = await c.execute(
                        "SELECT commands, audit_events, messages, batches"
                        " FROM commandbus.prune_v1(%s, NULL, %s)", (cutoff, args.chunk),
                    )  # fmt: skip
                    row = await cur.fetchone()
                    assert row is not None
                    totals["commands"] += row[0]
                    totals["audit_events"] += row[1]
                    totals["messages"] += row[2]
                    totals["chunks"] += 1
                    if row[0] == 0 and row[3] == 0:
                        finished = True
                        break
                cpu1 = _backend_cpu(pid)
            return finished, {"backend_cpu_s": None if cpu0 is None or cpu1 is None
                              else round(cpu1 - cpu0, 2), **totals}  # fmt: skip

        _log("today: chunked DELETE under load")
        out["retention_today"] = await _retention_under_load(
            today_dsn, args.backlog, args.concurrency, cpu,
            lambda stop: today_retention(cutoff, stop),
            args.window,
        )  # fmt: skip
        out["sizes_today_after"] = _sizes(today_dsn)
        save()
        drop_database(admin, today)

        # A week of simulated days: a new day of history, then retention of the oldest one.
        week = []
        for k in range(args.week):
            _log(f"ours: simulated day {k + 1}/{args.week}")
            t0 = time.monotonic()
            _generate(ours_dsn, args.history_days + k, 1, per_day, f"w{run_id}")
            gen = time.monotonic() - t0
            cut = DAY0 + timedelta(days=k + 3, hours=1)
            cpu0, t1 = cpu.sample(), time.monotonic()
            _, detail = await ours_retention(cut)
            cpu1 = cpu.sample()
            week.append({"generate_s": round(gen, 1),
                         "retention_s": round(time.monotonic() - t1, 2),
                         "db_cpu_s": None if cpu0 is None or cpu1 is None
                         else round(cpu1 - cpu0, 2), **detail})  # fmt: skip
            out["week"] = week
            out["sizes_week_day"] = {"day": k + 1, **_sizes(ours_dsn)}
            save()
        out["week"] = week
        with psycopg.connect(ours_dsn, autocommit=True) as conn:
            conn.execute("VACUUM commandbus.command")
        out["sizes_after_week"] = _sizes(ours_dsn)
    finally:
        if not args.keep:
            if not args.reuse:  # a database given to reuse is never dropped
                drop_database(admin, ours)
            drop_database(admin, today)
            drop_database(admin, fresh)
    out["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    save()
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="admin DSN of the server")  # fmt: skip
    p.add_argument("--history", type=int, default=20_000_000, help="finished commands")
    p.add_argument("--history-days", type=int, default=10, help="days they are spread over")
    p.add_argument("--commands", "-n", type=int, default=100_000, help="backlog per rate run")
    p.add_argument("--backlog", type=int, default=100_000,
                   help="commands kept pending during the retention runs")  # fmt: skip
    p.add_argument("--duty", type=float, default=0.3,
                   help="max_duty of the paced retention run")  # fmt: skip
    p.add_argument("--window", type=float, default=15.0,
                   help="seconds of each turn with and without retention")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument(
        "--repeat", type=int, default=2, help="throughput pairs (without / with history)"
    )
    p.add_argument("--chunk", type=int, default=1_000, help="retention chunk size")
    p.add_argument("--week", type=int, default=7, help="simulated days")
    p.add_argument("--out", type=Path, help="write the JSON summary here too")
    p.add_argument("--keep", action="store_true", help="keep the databases")
    p.add_argument("--throughput-only", action="store_true",
                   help="stop after the throughput pairs (with --reuse: more pairs on a kept"
                   " database)")  # fmt: skip
    p.add_argument("--reuse", help="an `ours` database of an earlier run (kept or cut short):"
                   " its history is topped up instead of made, and the rows its earlier load phases"
                   " sent (today's partitions) are removed")  # fmt: skip
    p.add_argument("--no-checkpoint", action="store_true",
                   help="no CHECKPOINT between a backlog and its drain (as before 2026-12-06"
                   " afternoon): the drain then shares the machine with the write-back of the"
                   " pages its backlog dirtied")  # fmt: skip
    p.add_argument("--ids", choices=sorted(NEW_ID), default="uuid4",
                   help="the command ids of the backlogs: random or time-ordered")  # fmt: skip
    return p


if __name__ == "__main__":
    arguments = _parser().parse_args()
    summary = asyncio.run(main(arguments))
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if arguments.out:
        arguments.out.write_text(text + "\n")
