"""`python -m commandbus demo`: send N no-op commands, work them off with one Worker, report.

Without `--dsn` (and without DATABASE_URL) a private PostgreSQL is started for the run.
Exit code 0 when every command sent ended COMPLETED exactly once (one COMPLETED audit row
each), 1 otherwise, 2 when the database cannot be reached, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.resources
import json
import os
import sys
import time
import uuid
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from commandbus import _db, _sql
from commandbus._dsn import redact_dsn
from commandbus.bus import CommandBus
from commandbus.embedded import EmbeddedServer
from commandbus.handler import HandlerRegistry
from commandbus.models import Command, HandlerContext, SendRequest
from commandbus.setup import setup_database
from commandbus.worker import Worker

DOMAIN = "demo"
COMMAND_TYPE = "Noop"
POLL_SECONDS = 0.2
CONNECT_TIMEOUT = 10


@functools.cache
def _demo_statements() -> dict[str, str]:
    """The demo's own queries (`demo.sql` next to this file, the format of `sql/statements/`)."""
    source = importlib.resources.files("commandbus").joinpath("demo.sql").read_text()
    return {s.name: s.text for s in _sql.parse_statements(source, "commandbus/demo.sql")}


async def _query(pool: AsyncConnectionPool[Any], name: str, *params: Any) -> list[tuple[Any, ...]]:
    return await _db.fetch_all_text(pool, _demo_statements()[name], *params)


async def _noop(command: Command, context: HandlerContext) -> dict[str, Any]:
    return {"ok": True}


def _progress(text: str) -> None:
    sys.stderr.write(f"\r{text}\x1b[K" if sys.stderr.isatty() else f"\r{text}")
    sys.stderr.flush()


async def _statuses(pool: AsyncConnectionPool[Any], ids: list[UUID]) -> dict[str, int]:
    rows = await _query(pool, "demo_statuses", DOMAIN, ids)
    return {str(status): int(n) for status, n in rows}


async def _audit_completed(pool: AsyncConnectionPool[Any], ids: list[UUID]) -> tuple[int, int]:
    rows = await _query(pool, "demo_audit_completed", DOMAIN, ids)
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


async def _stop_worker(worker: Worker, task: asyncio.Task[None]) -> None:
    if worker.is_running:
        await worker.stop(timeout=5.0)
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _work(pool: AsyncConnectionPool[Any], ids: list[UUID], args: argparse.Namespace) -> float:
    """Run one Worker until every command of `ids` is COMPLETED; return the seconds taken."""
    registry = HandlerRegistry()
    registry.register(DOMAIN, COMMAND_TYPE, _noop)
    worker = Worker(pool, DOMAIN, registry)
    n = len(ids)
    [(started,)] = await _query(pool, "demo_clock")
    t0 = time.perf_counter()
    task = asyncio.create_task(worker.run(concurrency=args.concurrency, poll_interval=1.0))
    try:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            # Progress from the updated_at index, not from the ids: dumping N ids every poll
            # took a third of this process's CPU, slowing the worker it measures.
            [(done,)] = await _query(pool, "demo_completed_since", started, DOMAIN)
            _progress(f"worked {done}/{n}")
            if done >= n:
                [(last,)] = await _query(pool, "demo_last_done", started, DOMAIN, ids)
                return float(last) if last else time.perf_counter() - t0
            if task.done():
                task.result()  # raises the worker's error
                raise RuntimeError("the worker stopped before all commands completed")
            if time.perf_counter() - t0 > args.timeout:
                raise TimeoutError(f"only {done}/{n} commands completed in {args.timeout:g} s")
    finally:
        sys.stderr.write("\n")
        await _stop_worker(worker, task)


async def _demo(dsn: str, args: argparse.Namespace) -> int:
    # One direct connection first: a wrong DSN is one line naming the cause (the pool would
    # retry it for 30 s and end in a traceback); the message shows the DSN without its password.
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        print(f"error: cannot connect to {redact_dsn(dsn)}: {exc}", file=sys.stderr)
        return 2
    await conn.close()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False)
    await pool.open(wait=True)
    try:
        await setup_database(pool)
        bus = CommandBus(pool)
        n: int = args.commands
        ids = [uuid.uuid4() for _ in range(n)]
        requests = [SendRequest(DOMAIN, COMMAND_TYPE, cid, {"i": i}) for i, cid in enumerate(ids)]
        t0 = time.perf_counter()
        try:
            await bus.send_batch(requests, on_progress=lambda s, t: _progress(f"sent {s}/{t}"))
        finally:
            sys.stderr.write("\n")
            await bus.close()
        send_s = time.perf_counter() - t0
        error: str | None = None
        try:
            work_s: float | None = await _work(pool, ids, args)
        except Exception as exc:  # reported below, with the counts: exit code 1
            work_s, error = None, f"{type(exc).__name__}: {exc}"
            print(f"error: {error}", file=sys.stderr)
        statuses = await _statuses(pool, ids)
        audit_rows, audit_distinct = await _audit_completed(pool, ids)
    finally:
        await pool.close()

    ok = statuses.get("COMPLETED", 0) == n and audit_rows == n and audit_distinct == n
    send_rate = n / send_s if send_s > 0 else 0.0
    work_rate = n / work_s if work_s else 0.0
    print(f"sent   {n} commands in {send_s:8.3f} s: {send_rate:10.0f} commands/s")
    if work_s is not None:
        print(f"worked {n} commands in {work_s:8.3f} s: {work_rate:10.0f} commands/s")
    print(f"\n{'status':<26}{'count':>10}")
    for status, count in sorted(statuses.items()):
        print(f"{status:<26}{count:>10}")
    print(f"{'COMPLETED audit rows':<26}{audit_rows:>10}\n")
    summary = {
        "commands": n,
        "concurrency": args.concurrency,
        "send_seconds": round(send_s, 4),
        "send_rate": round(send_rate, 1),
        "work_seconds": None if work_s is None else round(work_s, 4),
        "work_rate": round(work_rate, 1),
        "statuses": statuses,
        "audit_completed": audit_rows,
        "ok": ok,
        "error": error,
    }
    print(json.dumps(summary))
    return 0 if ok else 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcmd", description="reliable commands (rcmd) tools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="send N no-op commands and work them off, with timings")
    demo.add_argument("--commands", type=_positive_int, default=10_000, help="default: 10000")
    demo.add_argument("--concurrency", type=_positive_int, default=256, help="default: 256")
    demo.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL URL (default: $DATABASE_URL, else a private embedded server)",
    )
    demo.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds of work"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    server: EmbeddedServer | None = None
    try:
        dsn: str | None = args.dsn
        if dsn is None:
            print("starting an embedded PostgreSQL server...", file=sys.stderr)
            server = EmbeddedServer().start()
            dsn = server.dsn
        return asyncio.run(_demo(dsn, args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()


if __name__ == "__main__":
    sys.exit(main())
