"""Database CPU per command of the hot path's SQL alone: claim + finish, no worker, no handler.

    python benches/sql_cost.py                    # embedded PostgreSQL 18, 50,000 commands
    python benches/sql_cost.py -n 20000 --batch 128 --dsn postgresql://postgres@127.0.0.1/postgres
    python benches/sql_cost.py --perf /tmp/perf.data   # also `perf record -g` the backend

N commands are sent with `send_batch` into a fresh database, the command table is analyzed, then
one psycopg connection runs `claim_commands` (batch of `--batch`) and `finish_commands` (all
SUCCESS) in a loop until the queue is empty, with the exact statement text of `sql/statements/`.
The CPU time of that connection's server process (`/proc/<pid>/stat`: the server must run on this
machine) over the loop, divided by N, is the figure: it is what one command costs the database on
the hot path, without the noise of a worker and a harness sharing the machine. Used to A/B SQL
changes (the dev override `RCMD_SQL_DIR=/path/to/sql` makes setup and the statements come from
another tree); the throughput benchmark (`throughput.py`) measures the whole system.
"""

from __future__ import annotations

import argparse
import asyncio
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
from commandbus.testing import EmbeddedServer, create_database, drop_database, install_pgmq


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


def _drain(dsn: str, batch: int, perf_out: str | None) -> dict[str, Any]:
    claim, finish = _sql.statement("claim_commands"), _sql.statement("finish_commands")
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
            rows = cur.execute(claim, ("cost", 30, batch, 3)).fetchall()
            claim_s += time.perf_counter() - t
            if not rows:
                break
            k = len(rows)
            t = time.perf_counter()
            cur.execute(finish, (
                "cost", [r[3] for r in rows], [r[0] for r in rows], [r[1] for r in rows],
                ["SUCCESS"] * k, [None] * k, [None] * k, [None] * k, [None] * k, [None] * k,
                [0] * k, 3,
            )).fetchall()  # fmt: skip
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
    args = p.parse_args()
    server = None if args.dsn else EmbeddedServer().start()
    admin = args.dsn or (server.dsn if server else "")
    name = f"rcmd_sql_cost_{os.getpid()}"
    try:
        dsn = create_database(admin, name)
        install_pgmq(dsn)
        asyncio.run(_load(dsn, args.commands))
        result = _drain(dsn, args.batch, args.perf)
    finally:
        drop_database(admin, name)
        if server is not None:
            server.stop()
    print(result)
    return 0 if result["commands"] == args.commands and result["not_completed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
