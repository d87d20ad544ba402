"""Worker memory over a long run: `python benches/soak.py [-n 1000000] [--round 50000] [--dsn URL]`.

One worker process (this file with `--worker`) runs a no-op handler at concurrency 256 while this
process sends N commands in rounds with `send_batch`, waits for each round to be COMPLETED, and
samples the worker's resident memory (VmRSS from /proc) after every round. Warm-up is the first
round; the run passes when the last sample is within 10% of the warm-up sample and every command
was COMPLETED exactly once. Prints one line per round and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from psycopg import AsyncRawCursor
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    SendRequest,
    Worker,
    _sql,
    setup_database,
)
from commandbus.embedded import EmbeddedServer

DOMAIN = "soak"
# The benchmark's own queries (benches/sql/soak.sql, the format of sql/statements/).
_SOAK_SQL = {
    s.name: s.text
    for s in _sql.parse_statements(
        (Path(__file__).parent / "sql" / "soak.sql").read_text(), "benches/sql/soak.sql"
    )
}


async def _noop(command: Command, context: HandlerContext) -> None:
    return None


async def _work(dsn: str) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False)
    await pool.open()
    registry = HandlerRegistry()
    registry.register(DOMAIN, "Noop", _noop)
    worker = Worker(pool, DOMAIN, registry)
    try:
        await worker.run(concurrency=256, poll_interval=0.5, handle_signals=True)
    finally:
        await pool.close()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _count(pool: AsyncConnectionPool[Any], name: str, *params: Any) -> int:
    async with pool.connection() as conn, AsyncRawCursor(conn, row_factory=tuple_row) as cur:
        await cur.execute(_SOAK_SQL[name], list(params))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _soak(dsn: str, total: int, round_size: int) -> dict[str, Any]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False)
    await pool.open()
    await setup_database(pool)
    bus = CommandBus(pool)
    # Popen returns at once (no waiting): fine inside the event loop.
    worker = subprocess.Popen([sys.executable, __file__, "--worker", "--dsn", dsn])  # noqa: ASYNC220
    samples: list[int] = []
    sent = 0
    t0 = time.perf_counter()
    try:
        while sent < total:
            n = min(round_size, total - sent)
            ids = [uuid.uuid4() for _ in range(n)]
            await bus.send_batch(
                [SendRequest(DOMAIN, "Noop", cid, {"i": i}) for i, cid in enumerate(ids)]
            )
            sent += n
            while await _count(pool, "soak_completed", DOMAIN) < sent:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with {worker.returncode}")
                await asyncio.sleep(0.2)
            samples.append(_rss_kb(worker.pid))
            rate = sent / (time.perf_counter() - t0)
            print(
                f"{sent:>9,} completed  worker RSS {samples[-1] / 1024:7.1f} MB  ({rate:,.0f}/s)",
                flush=True,
            )
        audit = await _count(pool, "soak_audit_completed", DOMAIN)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        await bus.close()
        await pool.close()
    growth = (samples[-1] - samples[0]) / samples[0]
    return {
        "commands": total,
        "rss_warmup_mb": round(samples[0] / 1024, 1),
        "rss_last_mb": round(samples[-1] / 1024, 1),
        "rss_max_mb": round(max(samples) / 1024, 1),
        "growth_after_warmup": round(growth, 4),
        "audit_completed": audit,
        "ok": growth <= 0.10 and audit == total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--commands", type=int, default=1_000_000)
    parser.add_argument("--round", type=int, default=50_000)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_work(args.dsn))
        return 0
    if args.dsn:
        result = asyncio.run(_soak(args.dsn, args.commands, args.round))
    else:
        with EmbeddedServer() as server:
            result = asyncio.run(_soak(server.dsn, args.commands, args.round))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
