"""Cost of metrics on the hot path: end-to-end throughput with observers attached against
none, in one run, on one server, with the same N.

    python benches/metrics_overhead.py                       # embedded PostgreSQL 18
    python benches/metrics_overhead.py -n 20000 --concurrency 256 --repeat 5

Each measurement is throughput.py's end-to-end run (`Bench.end_to_end`): a fresh database, N
commands queued with `send_batch`, then one worker process (`_worker.py`) started and timed
until every command is COMPLETED, then stopped and verified (every command COMPLETED, one
COMPLETED audit row each, queue empty). The configurations:

  off       a plain `Worker` (no observer: the loop of every other benchmark)
  metrics   `commandbus.metrics.instrument(worker)` (prometheus-client counters, histograms)
  all       metrics + `commandbus.health.WorkerHealth` + `commandbus.tracing.instrument`
            (opentelemetry-api with no SDK: its no-op tracer, plus the per-batch read of
            the messages' trace contexts)
  health    metrics + health; tracing: metrics + tracing (`--configs`, to split `all`)

run interleaved, `--repeat` rounds, the order reversed every other round (drift on a shared
machine hits every configuration alike); the median of each counts.

First, in-process and without a database, the Python cost per command of the worker's
handler path with no per-command observer (what runs with metrics on or off: metrics count in
the Rust engine) against the path with one (`commandbus.health.WorkerHealth`, which counts
successes and failures in a row): `Worker._execute` awaited over 50,000 claimed rows with a
no-op handler and an engine stand-in whose `report` does nothing; best of 7 interleaved rounds.

Prints the tables (commands/s, worker CPU per command, ratio to `off`) and, last, one JSON
line. Exit status 0 when every verification passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp

from commandbus.embedded import EmbeddedServer

CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "off": ("no observer", ()),
    "metrics": ("metrics.instrument", ("--metrics",)),
    "all": ("metrics + health + tracing", ("--metrics", "--health", "--tracing")),
    "health": ("metrics + health", ("--metrics", "--health")),
    "tracing": ("metrics + tracing", ("--metrics", "--tracing")),
}
DEFAULT_CONFIGS = "off,metrics,all"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="end-to-end throughput with metrics on vs off",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--commands", "-n", type=int, default=20_000, help="N per run")
    p.add_argument("--concurrency", type=int, default=256, help="of the worker")
    p.add_argument("--repeat", type=int, default=5, help="rounds (median)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--payload-bytes", type=int, default=128, help="JSON size of `data`")
    p.add_argument("--pool-size", type=int, default=20, help="psycopg pool of each worker")
    p.add_argument("--dsn", default=os.environ.get("DATABASE_URL") or None)
    p.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    return p


def run(args: argparse.Namespace) -> int:
    server: EmbeddedServer | None = None
    if args.dsn is None:
        tp._log("starting an embedded PostgreSQL server")
        server = EmbeddedServer().start()
    try:
        bench = tp.Bench(args, server.dsn if server is not None else args.dsn, server)
        try:
            return _measure(bench, args)
        finally:
            bench.drop_all()
            shutil.rmtree(bench.workdir, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()


def micro(rounds: int = 7, n: int = 50_000) -> dict[str, float]:
    """Best per-command microseconds of the handler path without and with a per-command observer."""
    import asyncio

    from psycopg_pool import AsyncConnectionPool

    from commandbus import Command, HandlerContext, HandlerRegistry, Worker
    from commandbus.health import WorkerHealth

    class _Engine:  # NativeWorker.report, doing nothing
        def report(self, msg_id: int, attempt: int, outcome: Any) -> bool:
            return True

    async def noop(cmd: Command, ctx: HandlerContext) -> None:
        return None

    async def measure() -> dict[str, float]:
        registry = HandlerRegistry()
        registry.register(tp.DOMAIN, "Noop", noop)
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool("host=127.0.0.1", open=False)
        worker = Worker(pool, tp.DOMAIN, registry)
        observer = WorkerHealth(worker)
        engine: Any = _Engine()
        now = int(time.time() * 1e6)
        items: list[Any] = [(i, 1, 3, None, "Noop", "{}", None, None, None, now) for i in range(n)]

        async def plain() -> None:
            for item in items:
                await worker._execute(engine, item)

        async def observed() -> None:
            for item in items:
                await worker._execute(engine, item, observer)

        best = {"plain": float("inf"), "observed": float("inf")}
        for _ in range(rounds):
            for name, run in (("plain", plain), ("observed", observed)):
                t0 = time.perf_counter()
                await run()
                best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e6)
        return best

    return asyncio.run(measure())


def _median(values: list[float | None]) -> float | None:
    ok = [v for v in values if v is not None]
    return statistics.median(ok) if ok else None


def _measure(bench: tp.Bench, args: argparse.Namespace) -> int:
    tp._log("in-process: the handler path without and with a per-command observer (health)")
    path_us = micro()
    print(
        f"\nPython per command (best of 7): plain {path_us['plain']:.2f} us, with health "
        f"{path_us['observed']:.2f} us (+{path_us['observed'] - path_us['plain']:.2f} us)"
    )
    tp._log("creating template databases")
    bench.setup_templates(None)
    template = bench.db_name("ours_tpl")
    names = [c for c in args.configs.split(",") if c]
    impls = {
        k: tp.Impl("ours", CONFIGS[k][0], sys.executable, template, CONFIGS[k][1]) for k in names
    }
    rates: dict[str, list[float | None]] = {k: [] for k in impls}
    cpu: dict[str, list[float | None]] = {k: [] for k in impls}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in impls}
    for rep in range(args.repeat):
        order = list(impls) if rep % 2 == 0 else list(reversed(impls))
        for key in order:
            tp._log(f"{key}: {args.commands} commands, 1 process x{args.concurrency} "
                    f"(round {rep + 1}/{args.repeat})")  # fmt: skip
            result = bench.end_to_end(impls[key], 1, args.concurrency)
            summary = result.summary()
            rates[key].append(result.rate if result.ok else None)
            cpu[key].append(summary["worker_cpu_us_per_command"] if result.ok else None)
            runs[key].append(summary)
    med_rate = {k: _median(v) for k, v in rates.items()}
    med_cpu = {k: _median(v) for k, v in cpu.items()}

    base_rate, base_cpu = med_rate.get("off"), med_cpu.get("off")
    print(
        f"\nN = {args.commands}, 1 worker process x{args.concurrency}, "
        f"median of {args.repeat} interleaved rounds"
    )
    # Each round's ratio to `off` in the same round (drift between rounds cancels out), and
    # their median: the second estimator beside the ratio of the medians.
    per_round: dict[str, list[float]] = {}
    for k in impls:
        pairs = zip(rates[k], rates.get("off", []), strict=False)
        per_round[k] = [a / b for a, b in pairs if a and b]
    print(
        f"{'config':>8}  {'commands/s':>10}  {'vs off':>7}  {'per round':>9}  "
        f"{'worker us/cmd':>13}  {'vs off':>7}"
    )
    for k in impls:
        rate_ratio = tp._ratio(med_rate[k], base_rate)
        cpu_ratio = tp._ratio(med_cpu[k], base_cpu)
        round_ratio = statistics.median(per_round[k]) if per_round[k] else None
        print(
            f"{k:>8}  {tp._fmt(med_rate[k]):>10}  {tp._fmt(rate_ratio, 3):>7}  "
            f"{tp._fmt(round_ratio, 3):>9}  "
            f"{tp._fmt(med_cpu[k], 1):>13}  {tp._fmt(cpu_ratio, 3):>7}"
        )
    if bench.failures:
        print("\nFAILURES:\n  " + "\n  ".join(bench.failures))
    print(
        json.dumps(
            {
                "commands": args.commands,
                "concurrency": args.concurrency,
                "repeat": args.repeat,
                "cpu": tp._cpu_model(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "postgresql": bench.server_version,
                "python_path_us_per_command": path_us,
                "median_rates": med_rate,
                "median_worker_cpu_us_per_command": med_cpu,
                "per_round_ratios": per_round,
                "rates": rates,
                "runs": runs,
                "failures": bench.failures,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
    )
    return 0 if not bench.failures else 1


def main(argv: list[str] | None = None) -> int:
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
