"""The prune's own cost per command, no load: prune_v2 going on where its last chunk stopped
(`p_after`, as `prune()` calls it) against each chunk walking from the oldest row (`p_after`
NULL, as before 2026-12-06), day by day in turns, in one database.

    python benches/prune_cost.py --days 4 --per-day 500000

Needs a PostgreSQL server whose processes run on this machine (the backend's CPU is read from
/proc): default the machine's PostgreSQL at 127.0.0.1:5432 (`--dsn` for another admin DSN).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
import history

from commandbus.embedded import create_database, drop_database, install_pgmq
from commandbus.setup import setup_database


async def _setup(dsn: str) -> None:
    install_pgmq(dsn)
    async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
        await setup_database(pool)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--days", type=int, default=4, help="days of history (turns: walk, keyset)")
    p.add_argument("--per-day", type=int, default=500_000)
    p.add_argument("--chunk", type=int, default=1_000)
    args = p.parse_args(argv)
    name = "rcmd_prune_cost"
    dsn = create_database(args.dsn, name)
    result: dict[str, Any] = {"walk": [], "keyset": []}
    try:
        asyncio.run(_setup(dsn))
        with psycopg.connect(dsn, autocommit=True) as c:
            last = history.DAY0 + timedelta(days=args.days)
            c.execute(
                "SELECT commandbus.ensure_audit_partitions_v1(%s::date, %s::date)",
                (history.DAY0.date(), last.date()),
            )
            for d in range(args.days):
                history._history_day(c, history.DAY0 + timedelta(days=d), args.per_day, f"d{d}")
            c.execute("VACUUM ANALYZE commandbus.command")
            row = c.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            pid = row[0]
            for d in range(args.days):
                mode = "walk" if d % 2 == 0 else "keyset"
                cutoff = history.DAY0 + timedelta(days=d + 1)
                cpu0, t0, n, after = history._backend_cpu(pid), time.perf_counter(), 0, None
                while True:
                    r = c.execute(
                        "SELECT commands, batches, messages, last_created_at"
                        " FROM commandbus.prune_v2(%s, NULL, %s, %s)",
                        (cutoff, args.chunk, after if mode == "keyset" else None),
                    ).fetchone()
                    assert r is not None
                    n, after = n + r[0], r[3]
                    if r[:3] == (0, 0, 0):
                        break
                cpu1, seconds = history._backend_cpu(pid), time.perf_counter() - t0
                us = None if cpu0 is None or cpu1 is None else round((cpu1 - cpu0) / n * 1e6, 1)
                result[mode].append({"day": d, "commands": n, "seconds": round(seconds, 2),
                                     "backend_us_per_command": us})  # fmt: skip
                history._log(f"day {d} {mode}: {n} commands, {seconds:.2f} s, {us} us/command")
    finally:
        drop_database(args.dsn, name)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
