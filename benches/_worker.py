"""One worker process of the throughput benchmark (spawned by benches/throughput.py).

Runs with either library: this repository's `commandbus` (the venv of the project) or the
predecessor `reliable-cmd` 0.2.2 (its own venv); both expose the same public names used here
(`HandlerRegistry.register`, `Worker(pool, domain, registry)`, `run`, `stop`).

Protocol on stdin/stdout, one line each:
    worker -> parent  READY             (pool open, registry built)
    parent -> worker  GO                (start `Worker.run`)
    parent -> worker  STOP              (graceful `Worker.stop`)
    worker -> parent  {"handled": ...}  (JSON: handler calls, peak RSS, CPU seconds since GO)

The handler is a no-op (returns None). With `--record-starts FILE` it also records when each
handler started (time.time(), keyed by command id) and writes them to FILE as JSON at exit.

With `--sync` the worker is the library's `commandbus.sync.SyncWorker` over a psycopg
`ConnectionPool`, with a no-op plain `def` handler (`HandlerRegistry.register_sync`, which both
libraries have): `run()` blocks in a thread of its own, STOP calls `stop(timeout=30)`. No
asyncio in that mode (benches/sync_throughput.py).

`--metrics`, `--health` and `--tracing` attach this library's observers before the run
(`commandbus.metrics.instrument`, `commandbus.health.WorkerHealth`,
`commandbus.tracing.instrument`: benches/metrics_overhead.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

import commandbus
from commandbus import Command, HandlerContext, HandlerRegistry, Worker

COMMAND_TYPE = "Noop"


class _Stats:
    handled = 0
    starts: dict[str, float] | None = None


async def _noop(command: Command, context: HandlerContext) -> None:
    if _Stats.starts is not None:
        _Stats.starts[str(command.command_id)] = time.time()
    _Stats.handled += 1


def _noop_sync(command: Command, context: HandlerContext) -> None:
    if _Stats.starts is not None:
        _Stats.starts[str(command.command_id)] = time.time()
    _Stats.handled += 1  # one handler thread at a time here (GIL): close enough for a count


async def _readline() -> str:
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


def _peak_rss_kb() -> int:
    """VmHWM of this process. Not ru_maxrss: Linux carries it over exec() from the forking
    parent, so a worker spawned by a big parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _observe(worker: Any, args: argparse.Namespace) -> None:
    """Attach the observers asked for (imported only then: a plain run imports none)."""
    if args.metrics:
        from commandbus.metrics import instrument

        instrument(worker)
    if args.health:
        from commandbus.health import WorkerHealth

        WorkerHealth(worker)
    if args.tracing:
        from commandbus import tracing

        tracing.instrument(worker)


async def _main(args: argparse.Namespace) -> int:
    if args.record_starts:
        _Stats.starts = {}
    usage0: resource.struct_rusage | None = None
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        args.dsn, min_size=min(4, args.pool_size), max_size=args.pool_size, open=False
    )
    await pool.open(wait=True)
    try:
        registry = HandlerRegistry()
        registry.register(args.domain, COMMAND_TYPE, _noop)
        worker = Worker(pool, args.domain, registry)
        _observe(worker, args)
        _say("READY")
        if await _readline() != "GO":
            return 2
        # CPU from GO on: the timed run, its stop and the pool's close, not the imports and
        # connections before READY (~0.2 s per process here: ~8 us per command for 4
        # processes at N = 100,000, which made more processes look costlier than they are).
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        task = asyncio.create_task(
            worker.run(concurrency=args.concurrency, poll_interval=args.poll_interval)
        )
        stop = asyncio.create_task(_readline())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        error: str | None = None
        if task in done:  # the worker ended on its own: an error
            stop.cancel()
            exc = task.exception()
            error = f"worker stopped: {exc!r}"
        else:
            await worker.stop(timeout=30.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task, timeout=30.0)
            if not task.done():
                task.cancel()
                error = "worker did not stop within 30 s"
            elif task.exception() is not None:
                error = f"worker failed: {task.exception()!r}"
    finally:
        await pool.close()
    if _Stats.starts is not None:
        await asyncio.to_thread(Path(args.record_starts).write_text, json.dumps(_Stats.starts))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if usage0 is None:  # no GO came: report what there is
        usage0 = usage
    _say(
        json.dumps(
            {
                "handled": _Stats.handled,
                "max_rss_kb": _peak_rss_kb(),
                "cpu_user_s": usage.ru_utime - usage0.ru_utime,
                "cpu_sys_s": usage.ru_stime - usage0.ru_stime,
                "error": error,
                "library": commandbus.__file__,
            }
        )
    )
    return 0 if error is None else 1


def _main_sync(args: argparse.Namespace) -> int:
    """The same protocol with the library's SyncWorker (no asyncio)."""
    import threading

    from psycopg_pool import ConnectionPool

    from commandbus.sync import SyncWorker

    usage0: resource.struct_rusage | None = None
    error: str | None = None
    pool: ConnectionPool[Any] = ConnectionPool(
        args.dsn, min_size=min(4, args.pool_size), max_size=args.pool_size, open=False
    )
    pool.open(wait=True)
    try:
        registry = HandlerRegistry()
        registry.register_sync(args.domain, COMMAND_TYPE, _noop_sync)
        worker = SyncWorker(pool, args.domain, registry)
        _observe(worker, args)
        _say("READY")
        if sys.stdin.readline().strip() != "GO":
            return 2
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                worker.run(concurrency=args.concurrency, poll_interval=args.poll_interval)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=run, name="sync-worker-run")
        thread.start()
        stop = threading.Event()
        threading.Thread(
            target=lambda: (sys.stdin.readline(), stop.set()),
            daemon=True,  # STOP (or EOF)
        ).start()
        while thread.is_alive() and not stop.wait(0.2):
            pass
        if not thread.is_alive():
            error = f"worker stopped: {failure[0]!r}" if failure else "worker stopped"
        else:
            worker.stop(timeout=30.0)
            thread.join(30.0)
            if thread.is_alive():
                error = "worker did not stop within 30 s"
            elif failure:
                error = f"worker failed: {failure[0]!r}"
    finally:
        pool.close()
    if _Stats.starts is not None:
        Path(args.record_starts).write_text(json.dumps(_Stats.starts))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if usage0 is None:
        usage0 = usage
    _say(
        json.dumps(
            {
                "handled": _Stats.handled,
                "max_rss_kb": _peak_rss_kb(),
                "cpu_user_s": usage.ru_utime - usage0.ru_utime,
                "cpu_sys_s": usage.ru_stime - usage0.ru_stime,
                "error": error,
                "library": commandbus.__file__,
                "mode": "sync",
            }
        )
    )
    return 0 if error is None else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--record-starts", default=None)
    parser.add_argument("--sync", action="store_true", help="the library's SyncWorker")
    parser.add_argument("--metrics", action="store_true", help="commandbus.metrics.instrument")
    parser.add_argument("--health", action="store_true", help="commandbus.health.WorkerHealth")
    parser.add_argument("--tracing", action="store_true", help="commandbus.tracing.instrument")
    args = parser.parse_args()
    if args.sync:
        return _main_sync(args)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
