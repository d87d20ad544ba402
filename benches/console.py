"""The operator console on a large database: read times, bulk generation, cost to the workers.

    python benches/console.py                     # a private embedded PostgreSQL
    python benches/console.py --dsn postgresql://... (an empty database it may fill)

1. Fills the database with --commands command rows (default 1,000,000 over three domains,
   created over the last 7 days: 96% COMPLETED, 1% each FAILED / CANCELED / TSQ / PENDING, ten
   batches of 10,000) and --audit-per-command audit rows each (default 4: 4,000,000), with
   generate_series (benches/sql/console.sql), then ANALYZE.
2. Times every dashboard and list read --repeat times (median, p95, max in ms): the Monitor's
   calls, the TSQ list and count, and the console's pages over HTTP (FastAPI TestClient).
3. Times a bulk generation of --bulk commands (default 1,000,000) from the page path: POST
   /e2e/generate, then the job's progress polled until it is done.
4. Worker throughput with and without a dashboard refreshing every second, same run: rounds of
   --round-commands no-op commands worked by one worker process (benches/_worker.py), in the
   order off, on, on, off, off, on... (ABBA); "on" runs the console in its own process and
   fetches both dashboard fragments every second. Rate = commands / (last updated_at - GO).

Prints a JSON summary on the last line; benches/README.md has the method and the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, CommandStatus, SendRequest, _db, _sql
from commandbus.ops.monitor import CommandFilter, Monitor
from commandbus.ops.troubleshooting import TroubleshootingQueue
from commandbus.setup import setup_database

HERE = Path(__file__).resolve().parent
DOMAINS = ("orders", "billing", "shipping")
BENCH_DOMAIN = "bench"
_STATEMENTS = {
    s.name: s.text
    for s in _sql.parse_statements(
        (HERE / "sql" / "console.sql").read_text(), "benches/sql/console.sql"
    )
}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _query(pool: AsyncConnectionPool[Any], name: str, *params: Any) -> list[Any]:
    # The fill writes millions of rows in one statement: more than the library's deadline for
    # its own calls on a pool (3 x call_timeout).
    _db.set_pool_deadline(pool, 3600.0)
    return await _db.fetch_all_text(pool, _STATEMENTS[name], *params)


# -- 1. data -------------------------------------------------------------------------------


async def fill(pool: AsyncConnectionPool[Any], commands: int, per_command: int) -> float:
    t0 = time.perf_counter()
    for d in DOMAINS:
        await _query(pool, "console_create_queue", d)
    await _query(pool, "console_fill_commands", commands)
    _log(f"  {commands:,} commands in {time.perf_counter() - t0:.1f} s")
    await _query(pool, "console_fill_batches")
    t1 = time.perf_counter()
    await _query(pool, "console_fill_audit", per_command)
    _log(f"  {commands * per_command:,} audit rows in {time.perf_counter() - t1:.1f} s")
    for d in DOMAINS:
        await _query(pool, "console_fill_queue", d)
    await _query(pool, "console_analyze")
    return time.perf_counter() - t0


# -- 2. reads ------------------------------------------------------------------------------


def _summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(p95, 2),
        "max_ms": round(ordered[-1], 2),
    }


async def _time(call: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    ms = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await call()
        ms.append((time.perf_counter() - t0) * 1000)
    return _summary(ms)


async def reads(pool: AsyncConnectionPool[Any], repeat: int) -> dict[str, dict[str, float]]:
    monitor = Monitor(pool)
    tsq = TroubleshootingQueue(pool)
    out: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    await monitor.throughput(minutes=10)
    out["throughput(10 min), first call"] = {"median_ms": (time.perf_counter() - t0) * 1000}
    page = await monitor.list_commands(CommandFilter(domain="orders"), limit=50)
    for _ in range(20):  # a cursor 1,000 rows deep
        assert page.next_cursor is not None
        page = await monitor.list_commands(
            CommandFilter(domain="orders"), cursor=page.next_cursor, limit=50
        )
    deep = page.next_cursor
    some = page.items[0]
    [(batch_id,)] = await _query(pool, "console_some_batch")
    cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("domain_stats (dashboard)", monitor.domain_stats),
        ("throughput(10 min), refresh", lambda: monitor.throughput(minutes=10)),
        ("workers", monitor.workers),
        ("list: newest 50", lambda: monitor.list_commands(CommandFilter())),
        (
            "list: domain, 1,000 rows deep",
            lambda: monitor.list_commands(CommandFilter(domain="orders"), cursor=deep),
        ),
        (
            "list: status COMPLETED",
            lambda: monitor.list_commands(CommandFilter(status=CommandStatus.COMPLETED)),
        ),
        (
            "list: status TSQ (1%)",
            lambda: monitor.list_commands(
                CommandFilter(status=CommandStatus.IN_TROUBLESHOOTING_QUEUE)
            ),
        ),
        (
            "list: domain + type + status PENDING",
            lambda: monitor.list_commands(
                CommandFilter(domain="billing", command_type="Refund", status=CommandStatus.PENDING)
            ),
        ),
        (
            "list: batch",
            lambda: monitor.list_commands(CommandFilter(domain="orders", batch_id=batch_id)),
        ),
        (
            "list: command id",
            lambda: monitor.list_commands(CommandFilter(command_id=some.command_id)),
        ),
        ("tsq: list 50", lambda: tsq.list_troubleshooting("orders", None, 50, 0)),
        ("tsq: count", lambda: tsq.count_troubleshooting("orders")),
    ]
    for name, call in cases:
        out[name] = await _time(call, repeat)
        _log(f"  {name:<40} {out[name]}")
    return out


def http_reads(dsn: str, repeat: int) -> dict[str, dict[str, float]]:
    from fastapi.testclient import TestClient

    from commandbus.console import create_app
    from commandbus.console.settings import ConsoleSettings

    out: dict[str, dict[str, float]] = {}
    app = create_app(ConsoleSettings(read_only=True), dsn=dsn)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        client.get("/fragments/chart")  # the throughput window's first read
        for path in (
            "/fragments/stats",
            "/fragments/chart",
            "/commands",
            "/commands?status=IN_TROUBLESHOOTING_QUEUE",
            "/tsq?domain=orders",
            "/batches?domain=orders",
        ):
            ms = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                r = client.get(path)
                ms.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, (path, r.status_code)
            out[f"GET {path}"] = _summary(ms)
            _log(f"  GET {path:<38} {out[f'GET {path}']}")
    return out


# -- 3. bulk generation from the page ------------------------------------------------------


def bulk_from_page(dsn: str, count: int) -> dict[str, Any]:
    import re

    from fastapi.testclient import TestClient

    from commandbus.console import create_app
    from commandbus.console.settings import ConsoleSettings

    app = create_app(ConsoleSettings(), dsn=dsn)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        client.get("/e2e")
        token = client.cookies.get("rcmd_csrf")
        t0 = time.perf_counter()
        r = client.post(
            "/e2e/generate",
            data={
                "csrf_token": token,
                "count": str(count),
                "fail_permanent_pct": "1",
                "fail_transient_pct": "5",
            },
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        job = r.headers["location"].rsplit("/", 1)[1]
        polls = 0
        last_done = -1
        while True:
            frag = client.get(f"/fragments/jobs/{job}").text
            polls += 1
            state = re.search(r'data-state="(\w+)"', frag)
            done = re.search(r"data-done>([\d,]+)<", frag)
            if done is not None:
                n = int(done.group(1).replace(",", ""))
                if n != last_done and polls % 4 == 0:
                    _log(f"  progress {n:,}/{count:,}")
                last_done = n
            if state is None or state.group(1) != "running":
                break
            time.sleep(0.5)
        seconds = time.perf_counter() - t0
        assert state is not None and state.group(1) == "done", frag
        summary = re.search(r"data-summary>([^<]+)<", frag)
    return {
        "count": count,
        "seconds": round(seconds, 2),
        "rate": round(count / seconds),
        "progress_polls": polls,
        "job_summary": summary.group(1) if summary else None,
    }


# -- 4. worker throughput with and without a dashboard -------------------------------------


class Dashboard:
    """The console in its own process, its two dashboard fragments fetched every second."""

    def __init__(self, dsn: str, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "commandbus.console",
                "--dsn",
                dsn,
                "--port",
                str(port),
                "--read-only",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the console did not start") from None
                time.sleep(0.2)
        self.stop = threading.Event()
        self.refreshes: list[float] = []
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            for frag in ("/fragments/stats", "/fragments/chart"):
                urllib.request.urlopen(self.url + frag, timeout=10).read()
            self.refreshes.append((time.perf_counter() - t0) * 1000)
            self.stop.wait(max(0.0, 1.0 - (time.perf_counter() - t0)))

    def __enter__(self) -> Dashboard:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)
        self.proc.terminate()
        self.proc.wait(15)


async def _round(dsn: str, pool: AsyncConnectionPool[Any], n: int, concurrency: int) -> float:
    bus = CommandBus(pool)
    try:
        await bus.send_batch(
            [SendRequest(BENCH_DOMAIN, "Noop", uuid4(), {"i": i}) for i in range(n)]
        )
    finally:
        await bus.close()
    proc = subprocess.Popen(  # noqa: ASYNC220 (the harness: a blocking start is fine here)
        [
            sys.executable,
            str(HERE / "_worker.py"),
            "--dsn",
            dsn,
            "--domain",
            BENCH_DOMAIN,
            "--concurrency",
            str(concurrency),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    [(start,)] = await _query(pool, "console_clock")
    proc.stdin.write("GO\n")
    proc.stdin.flush()
    while not (await _query(pool, "console_queue_empty"))[0][0]:  # noqa: ASYNC110
        await asyncio.sleep(0.25)
    [(end,)] = await _query(pool, "console_last_done", BENCH_DOMAIN)
    proc.stdin.write("STOP\n")
    proc.stdin.flush()
    proc.stdout.readline()
    proc.wait(60)
    return n / (end - start).total_seconds()


async def throughput_ab(
    dsn: str, pool: AsyncConnectionPool[Any], n: int, rounds: int, concurrency: int
) -> dict[str, Any]:
    off: list[float] = []
    on: list[float] = []
    refresh_ms: list[float] = []
    await _round(dsn, pool, min(n, 10_000), concurrency)  # warm-up: queue, plans, caches
    for r in range(rounds):
        # ABBA: off-on, then on-off, so a drift of the machine's load favours neither.
        for with_console in (False, True) if r % 2 == 0 else (True, False):
            if not with_console:
                rate = await _round(dsn, pool, n, concurrency)
                off.append(rate)
                _log(f"  round {r + 1} without console: {rate:,.0f} commands/s")
                continue
            with Dashboard(dsn, 8765) as dash:
                rate = await _round(dsn, pool, n, concurrency)
            on.append(rate)
            refresh_ms += dash.refreshes
            _log(
                f"  round {r + 1} with a dashboard refreshing every second: {rate:,.0f}"
                f" commands/s ({len(dash.refreshes)} refreshes)"
            )
    return {
        "commands_per_round": n,
        "concurrency": concurrency,
        "without_console": [round(x) for x in off],
        "with_dashboard": [round(x) for x in on],
        "median_without": round(statistics.median(off)),
        "median_with": round(statistics.median(on)),
        "ratio_with_over_without": round(statistics.median(on) / statistics.median(off), 3),
        "dashboard_refresh_ms": _summary(refresh_ms) if refresh_ms else None,
    }


# -- main ----------------------------------------------------------------------------------


async def _main(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=8, open=False)
    await pool.open(wait=True)
    result: dict[str, Any] = {}
    try:
        await setup_database(pool)
        _log(f"filling: {args.commands:,} commands x {args.audit_per_command} audit rows")
        result["fill_seconds"] = round(await fill(pool, args.commands, args.audit_per_command), 1)
        [(commands, audit)] = await _query(pool, "console_sizes")
        result["rows"] = {"command": commands, "audit": audit}
        _log("reads (library):")
        result["reads"] = await reads(pool, args.repeat)
    finally:
        await pool.close()
    _log("reads (pages over HTTP):")
    result["pages"] = await asyncio.to_thread(http_reads, dsn, args.repeat)
    if args.bulk:
        _log(f"bulk generation of {args.bulk:,} from the page:")
        result["bulk"] = await asyncio.to_thread(bulk_from_page, dsn, args.bulk)
        _log(f"  {result['bulk']}")
    if args.rounds:
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False)
        await pool.open(wait=True)
        try:
            _log("worker throughput, without / with a dashboard refreshing every second:")
            result["throughput"] = await throughput_ab(
                dsn, pool, args.round_commands, args.rounds, args.concurrency
            )
        finally:
            await pool.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default=None, help="an empty database (default: embedded server)")
    p.add_argument("--commands", type=int, default=1_000_000)
    p.add_argument("--audit-per-command", type=int, default=4)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--bulk", type=int, default=1_000_000, help="0: skip")
    p.add_argument("--rounds", type=int, default=4, help="0: skip the throughput A/B")
    p.add_argument("--round-commands", type=int, default=50_000)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args(argv)
    server = None
    dsn = args.dsn
    if dsn is None:
        from commandbus.embedded import EmbeddedServer

        server = EmbeddedServer().start()
        dsn = server.dsn
    try:
        result = asyncio.run(_main(dsn, args))
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
