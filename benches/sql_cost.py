"""Database CPU per command of the hot path's SQL alone: claim + finish, no worker, no handler.

    python benches/sql_cost.py                    # embedded PostgreSQL 18, 50,000 commands
    python benches/sql_cost.py -n 20000 --batch 128 --dsn postgresql://postgres@127.0.0.1/postgres
    python benches/sql_cost.py --perf /tmp/perf.data   # also `perf record -g` the backend
    python benches/sql_cost.py --send             # the send path instead (see below)

N commands are sent with `send_batch` into a fresh database, the command table is analyzed, then
one psycopg connection runs the engine's claim (batch of `--batch`: `lease_messages` then
`claim_leased`; `claim_commands` with an SQL tree older than V009) and its flush
(`complete_commands`, all SUCCESS; `finish_commands` with a tree older than V009) in a loop
until the queue is empty, with the exact statement text of `sql/statements/`.
The CPU time of that connection's server process (`/proc/<pid>/stat`: the server must run on this
machine) over the loop, divided by N, is the figure: it is what one command costs the database on
the hot path, without the noise of a worker and a harness sharing the machine. Used to A/B SQL
changes (the dev override `RCMD_SQL_DIR=/path/to/sql` makes setup and the statements come from
another tree); the throughput benchmark (`throughput.py`) measures the whole system.

`--send` measures the send path instead, through `CommandBus` (the Rust engine, so the installed
build's SQL): one `send_batch` of N (chunks of 1,000) and `--singles` sequential `send`s, each
reported as the CPU of the engine's server process per command, wall time per command, and this
process's CPU per command (Python and the engine's threads). To A/B a change of the send path,
run it from two installed builds (e.g. a `git worktree` of the old commit in its own venv).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, SendRequest, _sql, setup_database
from commandbus.embedded import EmbeddedServer, create_database, drop_database, install_pgmq


def _backend_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(dsn: str, n: int) -> None:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False) as pool:
        await setup_database(pool)
        bus = CommandBus(pool)
        try:
            reqs = [
                SendRequest(domain="cost", command_type="X", command_id=uuid.uuid4(),
                            data={"i": i, "pad": "x" * 100})
                for i in range(n)
            ]  # fmt: skip
            await bus.send_batch(reqs)
        finally:
            await bus.close()


def _pids_cpu(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # ended meanwhile
            total += _backend_cpu_seconds(pid)
    return total


async def _send_cost(dsn: str, n: int, singles: int) -> dict[str, Any]:
    find = (
        "SELECT pid FROM pg_stat_activity"
        " WHERE application_name = 'rcmd bus' AND datname = current_database()"
    )
    async with AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False) as pool:
        await setup_database(pool)
        bus = CommandBus(pool)

        async def engine_pids() -> set[int]:
            async with pool.connection() as conn:
                return {int(r[0]) for r in await (await conn.execute(find)).fetchall()}

        try:
            await bus.send("cost", "X", uuid.uuid4(), {})  # the engine connects
            reqs = [
                SendRequest(domain="cost", command_type="X", command_id=uuid.uuid4(),
                            data={"i": i, "pad": "x" * 100})
                for i in range(n)
            ]  # fmt: skip
            result: dict[str, Any] = {"commands": n, "singles": singles}
            for kind, count in (("batch", n), ("single", singles)):
                pids = await engine_pids()
                cpu0, proc0, wall0 = _pids_cpu(pids), time.process_time(), time.perf_counter()
                if kind == "batch":
                    await bus.send_batch(reqs)
                else:
                    for i in range(singles):
                        await bus.send("cost", "X", uuid.uuid4(), {"i": i, "pad": "x" * 100})
                wall1, proc1 = time.perf_counter(), time.process_time()
                new = await engine_pids() - pids  # a connection opened meanwhile: all its CPU
                cpu1 = _pids_cpu(pids) + _pids_cpu(new)
                per = 1e6 / max(count, 1)
                result[kind] = {
                    "db_cpu_us_per_command": round((cpu1 - cpu0) * per, 1),
                    "wall_us_per_command": round((wall1 - wall0) * per, 1),
                    "client_cpu_us_per_command": round((proc1 - proc0) * per, 1),
                }
            async with pool.connection() as conn:
                row = await (
                    await conn.execute("SELECT count(*) FROM commandbus.command")
                ).fetchone()
            result["stored"] = int(row[0]) if row else -1
            return result
        finally:
            await bus.close()


def _drain(dsn: str, batch: int, perf_out: str | None) -> dict[str, Any]:
    # The engine's claim in two steps (V009), or one statement (`claim_commands`) for an older
    # tree: (lease, claim_leased) or (None, claim_commands).
    lease: str | None
    try:
        lease, claim = _sql.statement("lease_messages"), _sql.statement("claim_leased")
    except KeyError:
        lease, claim = None, _sql.statement("claim_commands")
    try:  # the engine's flush of SUCCESS outcomes only (V009); older trees: the general one
        finish, general = _sql.statement("complete_commands"), False
    except KeyError:
        finish, general = _sql.statement("finish_commands"), True
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE commandbus.command")
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(row[0])
        cur = psycopg.RawCursor(conn)
        perf = None
        if perf_out:
            perf = subprocess.Popen(
                ["perf", "record", "-F", "1999", "-g", "-p", str(pid), "-o", perf_out],
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        cpu0, wall0 = _backend_cpu_seconds(pid), time.perf_counter()
        done = 0
        claim_s = finish_s = 0.0
        while True:
            t = time.perf_counter()
            if lease is None:
                rows = cur.execute(claim, ("cost", 30, batch, 3)).fetchall()
            else:
                leased = cur.execute(lease, ("cost", 30, batch)).fetchone()
                ids = leased[0] if leased else None
                rows = cur.execute(claim, ("cost", ids, 3)).fetchall() if ids else []
            claim_s += time.perf_counter() - t
            if not rows:
                break
            k = len(rows)
            t = time.perf_counter()
            leases = ("cost", [r[3] for r in rows], [r[0] for r in rows], [r[1] for r in rows])
            # Each command's created_at as the claim returned it (its partition, schema V006).
            created = ([r[9] for r in rows],) if finish.count("$") > (12 if general else 5) else ()
            params: tuple[Any, ...]
            if general:
                params = (*leases, ["SUCCESS"] * k, [None] * k, [None] * k, [None] * k,
                          [None] * k, [None] * k, [0] * k, 3, *created)  # fmt: skip
            else:
                params = (*leases, [None] * k, *created)
            cur.execute(finish, params).fetchall()
            finish_s += time.perf_counter() - t
            done += k
        cpu1, wall1 = _backend_cpu_seconds(pid), time.perf_counter()
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        left = conn.execute(
            "SELECT count(*) FILTER (WHERE status <> 'COMPLETED') FROM commandbus.command"
        ).fetchone()
    per = 1e6 / max(done, 1)
    return {
        "commands": done,
        "batch": batch,
        "db_cpu_us_per_command": round((cpu1 - cpu0) * per, 1),
        "wall_us_per_command": round((wall1 - wall0) * per, 1),
        "claim_us_per_command": round(claim_s * per, 1),
        "finish_us_per_command": round(finish_s * per, 1),
        "not_completed": int(left[0]) if left else -1,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commands", "-n", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=256, help="commands per claim / finish call")
    p.add_argument("--dsn", default=os.environ.get("DATABASE_URL"),
                   help="admin DSN of a server on this machine (default: embedded)")  # fmt: skip
    p.add_argument("--perf", metavar="FILE", help="perf record -g the backend into FILE")
    p.add_argument("--days-ahead", type=int, default=0,
                   help="day partitions to create ahead before the drain (schema V006: every "
                        "partition is one more lock per statement)")  # fmt: skip
    p.add_argument("--send", action="store_true", help="measure the send path instead")
    p.add_argument("--singles", type=int, default=2_000, help="--send: one-at-a-time sends")
    args = p.parse_args()
    server = None if args.dsn else EmbeddedServer().start()
    admin = args.dsn or (server.dsn if server else "")
    name = f"rcmd_sql_cost_{os.getpid()}"
    try:
        dsn = create_database(admin, name)
        install_pgmq(dsn)
        if args.send:
            result = asyncio.run(_send_cost(dsn, args.commands, args.singles))
            ok = result["stored"] == 1 + args.commands + args.singles
        else:
            asyncio.run(_load(dsn, args.commands))
            if args.days_ahead:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(
                        "SELECT commandbus.ensure_day_partitions_v1(t, current_date,"
                        " current_date + %s) FROM unnest(ARRAY['commandbus.command',"
                        " 'commandbus.audit']::regclass[]) t",
                        (args.days_ahead,),
                    )
            result = _drain(dsn, args.batch, args.perf)
            result["days_ahead"] = args.days_ahead
            ok = result["commands"] == args.commands and result["not_completed"] == 0
    finally:
        drop_database(admin, name)
        if server is not None:
            server.stop()
    print(result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
