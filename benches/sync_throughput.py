"""Sync worker throughput: `SyncWorker` (plain `def` no-op handlers) against this library's
async `Worker` (async no-op handlers) and the predecessor's `SyncWorker` (reliable-cmd 0.2.2),
in one run, on one server, with the same N.

    python benches/sync_throughput.py                 # embedded PostgreSQL 18 (a few minutes)
    python benches/sync_throughput.py -n 20000 --concurrency 64,256 --repeat 3
    python benches/sync_throughput.py --skip-predecessor

Each measurement is throughput.py's end-to-end run (`Bench.end_to_end`): a fresh database, N
commands queued with `send_batch`, then one worker process (`_worker.py`, `--sync` for the
sync workers) started and timed until every command is COMPLETED (the last `updated_at`
minus the start), then stopped and verified (every command COMPLETED, one COMPLETED audit row
each, queue empty). The three workers run interleaved, each configuration `--repeat` times;
the median run counts. Prints a table (commands/s, sync/async and sync/predecessor ratios)
and, last, one JSON line. Exit status 0 when every verification passed.
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SyncWorker vs async Worker vs reliable-cmd 0.2.2's SyncWorker",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--commands", "-n", type=int, default=20_000, help="N per run")
    p.add_argument("--concurrency", type=tp._csv, default=[64, 256], help="comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="runs of each config (median)")
    p.add_argument("--payload-bytes", type=int, default=128, help="JSON size of `data`")
    p.add_argument("--pool-size", type=int, default=20, help="psycopg pool of each worker")
    p.add_argument("--dsn", default=os.environ.get("DATABASE_URL") or None)
    p.add_argument("--pred-venv", type=Path, default=tp.DEFAULT_PRED_VENV)
    p.add_argument("--skip-predecessor", action="store_true")
    p.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    return p


def run(args: argparse.Namespace) -> int:
    pred_python: str | None = None
    if not args.skip_predecessor:
        python, _state = tp.ensure_predecessor(args.pred_venv)
        pred_python = str(python)
    server: EmbeddedServer | None = None
    if args.dsn is None:
        tp._log("starting an embedded PostgreSQL server")
        server = EmbeddedServer(
            settings={
                "shared_preload_libraries": "pg_stat_statements",
                "pg_stat_statements.track": "all",
            }
        ).start()
    try:
        bench = tp.Bench(args, server.dsn if server is not None else args.dsn, server)
        try:
            return _measure(bench, args, pred_python)
        finally:
            bench.drop_all()
            shutil.rmtree(bench.workdir, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()


def _measure(bench: tp.Bench, args: argparse.Namespace, pred_python: str | None) -> int:
    tp._log("creating template databases")
    bench.setup_templates(pred_python)
    ours_tpl = bench.db_name("ours_tpl")
    impls = {
        "async": tp.Impl("ours", "rcmd Worker, async handlers", sys.executable, ours_tpl),
        "sync": tp.Impl("ours", "rcmd SyncWorker, def handlers", sys.executable, ours_tpl,
                        ("--sync",)),
    }  # fmt: skip
    if pred_python is not None:
        impls["pred_sync"] = tp.Impl(
            "pred", "reliable-cmd 0.2.2 SyncWorker", pred_python, bench.db_name("pred_tpl"),
            ("--sync",),
        )  # fmt: skip
    rates: dict[tuple[str, int], list[float | None]] = {}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for c in args.concurrency:
            for key, impl in impls.items():
                tp._log(f"{key}: {args.commands} commands, 1 process x{c} "
                        f"(run {rep + 1}/{args.repeat})")  # fmt: skip
                run = bench.end_to_end(impl, 1, c)
                rates.setdefault((key, c), []).append(run.rate if run.ok else None)
                runs.setdefault((key, c), []).append(run.summary() | {"ok": run.ok})
    medians: dict[tuple[str, int], float | None] = {}
    for k, values in rates.items():
        ok = [v for v in values if v is not None]
        medians[k] = statistics.median(ok) if ok else None

    print(f"\nN = {args.commands}, 1 worker process, median of {args.repeat} (commands/s)")
    head = f"{'concurrency':>11}  " + "  ".join(f"{k:>10}" for k in impls)
    print(head + f"  {'sync/async':>10}  {'sync/pred':>10}")
    for c in args.concurrency:
        cells = "  ".join(tp._fmt(medians.get((k, c))).rjust(10) for k in impls)
        sa = tp._ratio(medians.get(("sync", c)), medians.get(("async", c)))
        sp = tp._ratio(medians.get(("sync", c)), medians.get(("pred_sync", c)))
        print(f"{c:>11}  {cells}  {tp._fmt(sa, 2):>10}  {tp._fmt(sp, 1):>10}")
    if bench.failures:
        print("\nFAILURES:\n  " + "\n  ".join(bench.failures))
    print(
        json.dumps(
            {
                "commands": args.commands,
                "repeat": args.repeat,
                "cpu": tp._cpu_model(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "postgresql": bench.server_version,
                "median_rates": {f"{k}@{c}": v for (k, c), v in medians.items()},
                "rates": {f"{k}@{c}": v for (k, c), v in rates.items()},
                "runs": {f"{k}@{c}": v for (k, c), v in runs.items()},
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
