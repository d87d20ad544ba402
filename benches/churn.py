"""Does the worker slow as dead rows pile up, and does a VACUUM bring it back? Drains of `-n`
commands in one fresh database, one after another, each with the dead and live rows of the
command and queue tables, how often autovacuum has visited them, and what one lease of 256
messages costs (pages read, ms: EXPLAIN ANALYZE of the lease's scan, which walks the queue
table's vt index past the dead entries not yet vacuumed); then one VACUUM and two more drains.

    python benches/churn.py -n 200000 --rounds 5              # the machine's PostgreSQL
    python benches/churn.py -n 200000 --rounds 5 --embedded   # the embedded PostgreSQL 18
    python benches/churn.py --embedded --naptime 1min --untuned   # as before V005
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
import history

from commandbus.embedded import EmbeddedServer, create_database, drop_database, install_pgmq
from commandbus.setup import setup_database

NAME = "rcmd_churn"


def _tables(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT relname, n_live_tup, n_dead_tup, autovacuum_count,"
            " pg_total_relation_size(relid) FROM pg_stat_user_tables"
            " WHERE relname IN ('q_bench__commands', 'command') ORDER BY relname"
        ).fetchall()
    keys = ("table", "live", "dead", "autovacuums", "bytes")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def _lease_cost(dsn: str) -> dict[str, float]:
    """Pages and ms of one lease's scan (the statement of lease_messages_v1, rows locked and
    let go: the probe's transaction ends without an update) over a backlog of 1,000."""
    history._backlog(dsn, 1_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET enable_seqscan = off")
        c.execute("SET enable_bitmapscan = off")
        plan = c.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT msg_id"
            f" FROM pgmq.q_{history.QUEUE} WHERE vt <= clock_timestamp()"
            " ORDER BY vt LIMIT 256 FOR UPDATE SKIP LOCKED".encode()
        ).fetchone()
    top = plan[0][0] if plan else {}
    node = top.get("Plan", {})
    pages = node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)
    return {"pages": pages, "ms": round(top.get("Execution Time", 0.0), 2)}


async def _run(admin: str, n: int, rounds: int, untuned: bool) -> dict[str, Any]:
    dsn = create_database(admin, NAME)
    out: dict[str, Any] = {"rounds": [], "after_vacuum": []}
    try:
        install_pgmq(dsn)
        async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
            await setup_database(pool)
            async with pool.connection() as conn:
                await conn.execute(f"SELECT commandbus.ensure_queue_v1('{history.QUEUE}')")
                if untuned:  # the queue table as PGMQ creates it (before V005)
                    await conn.execute(
                        f"ALTER TABLE pgmq.q_{history.QUEUE} RESET (autovacuum_vacuum_threshold,"
                        " autovacuum_vacuum_scale_factor, autovacuum_vacuum_cost_delay,"
                        " autovacuum_analyze_threshold, autovacuum_analyze_scale_factor,"
                        " vacuum_index_cleanup)".encode()
                    )
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute("SHOW autovacuum").fetchone()
            out["autovacuum"] = row[0] if row else None
            row = c.execute("SHOW autovacuum_naptime").fetchone()
            out["autovacuum_naptime"] = row[0] if row else None
            row = c.execute(
                f"SELECT reloptions FROM pg_class WHERE oid = 'pgmq.q_{history.QUEUE}'::regclass"
            ).fetchone()
            out["queue_reloptions"] = row[0] if row else None
        for k in range(rounds):
            rate = await history._throughput(dsn, n, 256)
            lease = _lease_cost(dsn)
            out["rounds"].append({"rate": round(rate), "lease": lease, "tables": _tables(dsn)})
            history._log(f"drain {k + 1}: {rate:,.0f} commands/s, lease {lease} {_tables(dsn)}")
        with psycopg.connect(dsn, autocommit=True) as c:
            t0 = time.perf_counter()
            c.execute(f"VACUUM (ANALYZE) pgmq.q_{history.QUEUE}".encode())
            c.execute("VACUUM (ANALYZE) commandbus.command")
            out["vacuum_s"] = round(time.perf_counter() - t0, 2)
        for k in range(2):
            rate = await history._throughput(dsn, n, 256)
            lease = _lease_cost(dsn)
            out["after_vacuum"].append(
                {"rate": round(rate), "lease": lease, "tables": _tables(dsn)}
            )
            history._log(f"after VACUUM {k + 1}: {rate:,.0f} commands/s")
    finally:
        drop_database(admin, NAME)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--embedded", action="store_true", help="an embedded PostgreSQL 18 instead")
    p.add_argument("-n", type=int, default=200_000, help="commands per drain")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--untuned", action="store_true",
        help="reset the queue table's autovacuum settings (V005) to PostgreSQL's defaults",
    )  # fmt: skip
    p.add_argument("--naptime", help="the embedded server's autovacuum_naptime (default 10s)")
    args = p.parse_args(argv)
    if args.embedded:
        settings = {"autovacuum_naptime": args.naptime} if args.naptime else None
        with EmbeddedServer(max_connections=100, settings=settings) as server:
            result = asyncio.run(_run(server.dsn, args.n, args.rounds, args.untuned))
    else:
        result = asyncio.run(_run(args.dsn, args.n, args.rounds, args.untuned))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
