"""Throughput benchmark: this library vs its predecessor (reliable-cmd 0.2.2) vs PGMQ alone.

    python benches/throughput.py            # embedded PostgreSQL 18, default sizes (minutes)
    python benches/throughput.py --help     # sizes, concurrency, processes, payload, DSN

One run, one server, the same payloads and no-op handlers for everybody:

1. this library (`commandbus` of this repository): `send` one at a time (rate, p50/p99
   latency; on the Rust path and with `conn=`), `send_batch` and `create_batch` bulk sends,
   end-to-end work (N commands queued, then worker processes until all are COMPLETED: one
   process at each concurrency, then 2 and 4 processes at the best one), pickup latency at
   low load (one send every 10 ms, send return -> handler start);
2. the predecessor `reliable-cmd==0.2.2` from PyPI, in its own venv (created on first use),
   doing the same through its public API, in a separate database (its own schema), as
   subprocesses run by that venv's python; its `pgmq.read` row parsing is patched to read
   columns by name (PGMQ 1.13 added columns; see benches/README.md);
3. the raw ceiling: PGMQ alone: `pgmq.send_batch` in chunks of 1,000, and
   `pgmq.read(q, 30, 100)` + `pgmq.delete(q, ids)` loops on 1 and on 4 connections.

Every end-to-end run is verified: every command COMPLETED, exactly one COMPLETED audit row
each, queue empty. PostgreSQL CPU per command comes from /proc (the postmaster and its
children: live ones plus the reaped ones folded into the postmaster's cutime/cstime); with
pg_stat_statements (preloaded on the embedded server) the top statements of the best
single-process run are kept in the JSON. Workers report their peak RSS and CPU.

Output: a table (absolute numbers and ratios) and, last, one JSON line. Exit status 0 when
every verification passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from uuid import uuid4

import psycopg
from psycopg import AsyncConnection, sql

import commandbus
from commandbus import setup_database
from commandbus.embedded import EmbeddedServer, create_database, drop_database, install_pgmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _client import PgCpu, make_data, make_message

BENCH_DIR = Path(__file__).resolve().parent
DOMAIN = "bench"
QUEUE = f"{DOMAIN}__commands"
QUEUE_LENGTH = sql.SQL("SELECT count(*) FROM pgmq.{}").format(sql.Identifier(f"q_{QUEUE}"))
# The harness's own "done yet?" poll during a run: the first message left in the queue, by its
# primary key (a few index pages). Counting the COMPLETED rows instead scans the whole command
# table: ~100 ms per poll at N = 100,000 on 2 cores, up to a fifth of one core taken from the
# system under test (and counted in its PostgreSQL CPU). COMPLETED is counted once the queue
# is empty.
QUEUE_HEAD = sql.SQL("SELECT msg_id FROM pgmq.{} ORDER BY msg_id LIMIT 1").format(
    sql.Identifier(f"q_{QUEUE}")
)
PREDECESSOR = "reliable-cmd==0.2.2"
DEFAULT_PRED_VENV = Path(tempfile.gettempdir()) / "rcmd-bench-pred-venv"
DB_PREFIX = f"rcmd_bench_{os.getpid()}"  # private names: runs may share a server
POLL_SECONDS = 0.2
RAW_READ_QTY = 100
RAW_SEND_CHUNK = 1_000

# The local patch of the predecessor (see benches/README.md): PGMQ 1.13's pgmq.read returns
# (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers); reliable-cmd 0.2.2 reads
# `SELECT *` by position and takes `vt` for the message. Name the columns it expects instead.
# The same statement of its sync API (`SyncWorker`, benches/sync_throughput.py) is in
# `_core/pgmq_sql.py`, with the same positional parsing: patched the same way.
PRED_READ_FILE = ("commandbus", "pgmq", "client.py")
PRED_READ_OLD = '"SELECT * FROM pgmq.read(%s, %s, %s)"'
PRED_READ_NEW = '"SELECT msg_id, read_ct, enqueued_at, vt, message FROM pgmq.read(%s, %s, %s)"'
PRED_SYNC_READ_FILE = ("commandbus", "_core", "pgmq_sql.py")


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# PostgreSQL CPU from /proc
# --------------------------------------------------------------------------------------------


def _scalar(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query.encode()).fetchone()
    if row is None:
        raise RuntimeError(f"no row from {query!r}")
    return row[0]


def _postmaster_of(conn: psycopg.Connection[Any]) -> int | None:
    """The postmaster of the server `conn` is connected to, when it runs on this machine."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    fields = PgCpu.stat_fields(row[0]) if row else None
    return int(fields[1]) if fields else None


# --------------------------------------------------------------------------------------------
# the predecessor's venv
# --------------------------------------------------------------------------------------------


def ensure_predecessor(venv: Path) -> tuple[Path, str]:
    """Create the venv with reliable-cmd 0.2.2 if needed and apply the read patch.

    Returns the venv's python and what was done to the patched file."""
    python = venv / "bin" / "python"
    if not python.exists():
        _log(f"creating the predecessor's venv in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('reliable-cmd'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != PREDECESSOR.split("==")[1]:
        _log(f"installing {PREDECESSOR} from PyPI into {venv}")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", PREDECESSOR], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    states = []
    for parts in (PRED_READ_FILE, PRED_SYNC_READ_FILE):
        target = Path(site).joinpath(*parts)
        text = target.read_text()
        if PRED_READ_NEW in text:
            state = "already patched"
        elif text.count(PRED_READ_OLD) == 1:
            target.write_text(text.replace(PRED_READ_OLD, PRED_READ_NEW))
            state = "patched"
        else:
            raise RuntimeError(f"{target}: the predecessor's pgmq.read statement was not found")
        states.append(f"{target}: {state}")
    return python, "; ".join(states)


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Verification:
    expected: int
    statuses: dict[str, int]
    audit_completed: int
    audit_completed_distinct: int
    queue_length: int
    handled: int | None = None

    @property
    def ok(self) -> bool:
        return (
            self.statuses.get("COMPLETED", 0) == self.expected
            and sum(self.statuses.values()) == self.expected
            and self.audit_completed == self.expected
            and self.audit_completed_distinct == self.expected
            and self.queue_length == 0
        )


@dataclass
class WorkRun:
    impl: str
    processes: int
    concurrency: int
    commands: int
    send_batch_seconds: float | None = None
    send_batch_pg_cpu_seconds: float | None = None
    seconds: float | None = None
    pg_cpu_seconds: float | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    verification: Verification | None = None
    statements: list[dict[str, Any]] | None = None
    error: str | None = None
    all_rates: list[float | None] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        return self.commands / self.seconds if self.seconds else None

    @property
    def ok(self) -> bool:
        return self.error is None and self.verification is not None and self.verification.ok

    def summary(self) -> dict[str, Any]:
        rss = [w["max_rss_kb"] for w in self.workers if "max_rss_kb" in w]
        cpu = [w["cpu_user_s"] + w["cpu_sys_s"] for w in self.workers if "cpu_user_s" in w]
        return {
            "processes": self.processes,
            "concurrency": self.concurrency,
            "commands": self.commands,
            "seconds": _round(self.seconds, 4),
            "rate": _round(self.rate, 1),
            "rates_of_repeats": self.all_rates,
            "send_batch_seconds": _round(self.send_batch_seconds, 4),
            "pg_cpu_us_per_command": _per_command_us(self.pg_cpu_seconds, self.commands),
            "worker_cpu_us_per_command": _per_command_us(sum(cpu) if cpu else None, self.commands),
            "worker_peak_rss_mb": round(max(rss) / 1024.0, 1) if rss else None,
            "verification": None
            if self.verification is None
            else {**asdict(self.verification), "ok": self.verification.ok},
            "ok": self.ok,
            "error": self.error,
        }


def _median_run(candidates: list[WorkRun]) -> WorkRun:
    """The run with the median rate among the successful ones (else the first failed one)."""
    ok = sorted((r for r in candidates if r.ok and r.rate), key=lambda r: r.rate or 0.0)
    chosen = ok[(len(ok) - 1) // 2] if ok else candidates[0]
    chosen.all_rates = [_round(r.rate, 1) for r in candidates]
    return chosen


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _per_command_us(seconds: float | None, n: int) -> float | None:
    return None if seconds is None or n <= 0 else round(seconds / n * 1e6, 1)


@dataclass
class Impl:
    name: str  # "ours" | "pred"
    label: str
    python: str
    template: str
    worker_args: tuple[str, ...] = ()  # extra arguments of _worker.py (`--sync`)


class Bench:
    def __init__(self, args: argparse.Namespace, admin_dsn: str, server: EmbeddedServer | None):
        self.args = args
        self.admin_dsn = admin_dsn
        self.server = server
        self.workdir = Path(tempfile.mkdtemp(prefix="rcmd-bench-"))
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            if server is not None:
                pid_line = (server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
                self.cpu = PgCpu(int(pid_line))
            else:
                self.cpu = PgCpu(_postmaster_of(conn))
            self.server_version = str(_scalar(conn, "SHOW server_version"))
            self.statements = self._enable_pg_stat_statements(conn)
        self.failures: list[str] = []
        self.pgmq_install: str | None = None  # how PGMQ got into the databases
        self.pred_setup: dict[str, Any] | None = None

    # -- databases ---------------------------------------------------------------------------

    def _enable_pg_stat_statements(self, conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
        if not row or "pg_stat_statements" not in str(row[0]):
            return False
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        except psycopg.Error:
            return False
        return True

    def db_name(self, kind: str) -> str:
        return f"{DB_PREFIX}_{kind}"

    def fresh(self, impl: str, template: str) -> str:
        """A new database `rcmd_bench_<impl>` copied from the impl's template."""
        return create_database(self.admin_dsn, self.db_name(impl), template=template)

    def setup_templates(self, pred_python: str | None) -> None:
        ours_tpl = create_database(self.admin_dsn, self.db_name("ours_tpl"))
        asyncio.run(_setup_ours(ours_tpl))
        raw_tpl = create_database(self.admin_dsn, self.db_name("raw_tpl"))
        self.pgmq_install = install_pgmq(raw_tpl)
        with psycopg.connect(raw_tpl, autocommit=True) as conn:
            conn.execute("SELECT pgmq.create(%s)", (QUEUE,))
        if pred_python is not None:
            pred_tpl = create_database(self.admin_dsn, self.db_name("pred_tpl"))
            install_pgmq(pred_tpl)  # the same SQL-only PGMQ where the server lacks the extension
            self.pred_setup = self.client(pred_python, "setup-pred", pred_tpl)

    def drop_all(self) -> None:
        for kind in ("ours", "pred", "raw", "ours_tpl", "pred_tpl", "raw_tpl"):
            with contextlib.suppress(Exception):
                drop_database(self.admin_dsn, self.db_name(kind))

    def checkpoint(self) -> None:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.admin_dsn, autocommit=True) as conn,
        ):
            conn.execute("CHECKPOINT")

    # -- subprocesses ------------------------------------------------------------------------

    def _env(self, python: str) -> dict[str, str]:
        # The predecessor's python must not see this repository's package; ours keeps the
        # PYTHONPATH it was started with (a worktree's `python/` ahead of the venv's install).
        drop = ("PYTHONHOME",) if python == sys.executable else ("PYTHONPATH", "PYTHONHOME")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def client(self, python: str, command: str, dsn: str, *extra: str) -> dict[str, Any]:
        cmd = [python, str(BENCH_DIR / "_client.py"), command, "--dsn", dsn, "--domain", DOMAIN]
        cmd += ["--payload-bytes", str(self.args.payload_bytes), *extra]
        if self.cpu.pid is not None:
            cmd += ["--pg-pid", str(self.cpu.pid)]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.workdir,
            env=self._env(python),
            timeout=self.args.timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{Path(python).parent.parent.name} _client.py {command} exited "
                f"{proc.returncode}:\n{proc.stderr[-3000:]}"
            )
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        _check_library(python, result.get("library"))
        return result

    def _spawn_worker(
        self, impl: Impl, dsn: str, concurrency: int, index: int, record: Path | None
    ) -> tuple[subprocess.Popen[str], Path]:
        cmd = [impl.python, str(BENCH_DIR / "_worker.py"), "--dsn", dsn, "--domain", DOMAIN]
        cmd += ["--concurrency", str(concurrency), "--pool-size", str(self.args.pool_size)]
        if record is not None:
            cmd += ["--record-starts", str(record)]
        cmd += impl.worker_args
        log = self.workdir / f"worker-{impl.name}-{index}.log"
        with log.open("w") as logf:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logf,
                text=True,
                cwd=self.workdir,
                env=self._env(impl.python),
            )
        return proc, log

    @staticmethod
    def _readline(stream: IO[str], timeout: float) -> str | None:
        ready, _, _ = select.select([stream], [], [], timeout)
        return stream.readline().strip() if ready else None

    # -- end-to-end ----------------------------------------------------------------------------

    def work(
        self,
        impl: Impl,
        dsn: str,
        processes: int,
        concurrency: int,
        expected: int,
        *,
        record: Path | None = None,
        during: Any = None,
    ) -> WorkRun:
        """Start `processes` workers, let them run until `expected` commands are COMPLETED
        (after `during()` returns, if given), stop them and verify."""
        run = WorkRun(impl.name, processes, concurrency, expected)
        procs: list[tuple[subprocess.Popen[str], Path]] = []
        try:
            for i in range(processes):
                procs.append(
                    self._spawn_worker(impl, dsn, concurrency, i, record if i == 0 else None)
                )
            for proc, log in procs:
                assert proc.stdout is not None
                if self._readline(proc.stdout, 60.0) != "READY":
                    raise RuntimeError(f"worker not ready: {log.read_text()[-2000:]}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                self._reset_statements()
                cpu0 = self.cpu.sample()
                start = _scalar(conn, "SELECT clock_timestamp()")
                for proc, _ in procs:
                    assert proc.stdin is not None
                    proc.stdin.write("GO\n")
                    proc.stdin.flush()
                if during is not None:
                    during()
                deadline = time.monotonic() + self.args.timeout
                while True:
                    done = 0
                    if conn.execute(QUEUE_HEAD).fetchone() is None:
                        row = conn.execute(
                            "SELECT count(*) FROM commandbus.command"
                            " WHERE domain = %s AND status = 'COMPLETED'",
                            (DOMAIN,),
                        ).fetchone()
                        done = int(row[0]) if row else 0
                    if done >= expected:
                        break
                    dead = [log for proc, log in procs if proc.poll() is not None]
                    if dead:
                        raise RuntimeError(f"a worker exited: {dead[0].read_text()[-2000:]}")
                    if time.monotonic() > deadline:
                        row = conn.execute(
                            "SELECT count(*) FROM commandbus.command"
                            " WHERE domain = %s AND status = 'COMPLETED'",
                            (DOMAIN,),
                        ).fetchone()
                        raise TimeoutError(f"only {row[0] if row else 0}/{expected} COMPLETED")
                    time.sleep(POLL_SECONDS)
                cpu1 = self.cpu.sample()
                row = conn.execute(
                    "SELECT extract(epoch FROM max(updated_at) - %s::timestamptz)"
                    " FROM commandbus.command WHERE domain = %s AND status = 'COMPLETED'",
                    (start, DOMAIN),
                ).fetchone()
                run.seconds = float(row[0]) if row and row[0] is not None else None
                if cpu0 is not None and cpu1 is not None:
                    run.pg_cpu_seconds = cpu1 - cpu0
                run.statements = self._top_statements()
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            run.workers = self._stop_workers(procs)
        errors = [w["error"] for w in run.workers if w.get("error")]
        if errors and run.error is None:
            run.error = "; ".join(errors)
        run.verification = self.verify(dsn, expected)
        run.verification.handled = sum(int(w.get("handled", 0)) for w in run.workers)
        return run

    def _stop_workers(
        self, procs: list[tuple[subprocess.Popen[str], Path]]
    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for proc, _ in procs:
            if proc.poll() is None and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write("STOP\n")
                    proc.stdin.flush()
        for proc, log in procs:
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            lines = [line for line in (out or "").splitlines() if line.startswith("{")]
            if lines:
                results.append(json.loads(lines[-1]))
                _check_library(str(proc.args[0]), results[-1].get("library"))  # type: ignore[index]
            else:
                results.append(
                    {"error": f"no result (exit {proc.returncode}): {log.read_text()[-1500:]}"}
                )
        return results

    def verify(self, dsn: str, expected: int) -> Verification:
        with psycopg.connect(dsn, autocommit=True) as conn:
            statuses = {
                str(s): int(n)
                for s, n in conn.execute(
                    "SELECT status, count(*) FROM commandbus.command WHERE domain = %s"
                    " GROUP BY status",
                    (DOMAIN,),
                ).fetchall()
            }
            audit = conn.execute(
                "SELECT count(*), count(DISTINCT command_id) FROM commandbus.audit"
                " WHERE domain = %s AND event_type = 'COMPLETED'",
                (DOMAIN,),
            ).fetchone()
            queue = conn.execute(QUEUE_LENGTH).fetchone()
        return Verification(
            expected=expected,
            statuses=statuses,
            audit_completed=int(audit[0]) if audit else -1,
            audit_completed_distinct=int(audit[1]) if audit else -1,
            queue_length=int(queue[0]) if queue else -1,
        )

    # -- pg_stat_statements --------------------------------------------------------------------

    def _reset_statements(self) -> None:
        if not self.statements:
            return
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")

    def _top_statements(self, limit: int = 8) -> list[dict[str, Any]] | None:
        if not self.statements:
            return None
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT s.toplevel, s.calls, s.total_exec_time, s.rows, left(regexp_replace("
                "s.query, '\\s+', ' ', 'g'), 140) FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname LIKE %s"
                " ORDER BY s.total_exec_time DESC LIMIT %s",
                (f"{DB_PREFIX}_%", limit),
            ).fetchall()
        return [
            {"toplevel": t, "calls": c, "total_ms": round(ms, 1), "rows": r, "query": q}
            for t, c, ms, r, q in rows
        ]

    # -- phases ------------------------------------------------------------------------------

    def single_sends(self, impl: Impl, conn_mode: bool) -> dict[str, Any]:
        dsn = self.fresh(impl.name, impl.template)
        extra = ["--n", str(self.args.single)] + (["--conn"] if conn_mode else [])
        out = self.client(impl.python, "single", dsn, *extra)
        lat: list[float] = out["latencies_ms"]
        n = len(lat)
        total = n + int(out["warmup"])
        rows = self._count(dsn)
        if rows != total:
            self.failures.append(f"{impl.name} single send: {rows} rows, expected {total}")
        return {
            "commands": n,
            "rate": round(n / out["seconds"], 1),
            "p50_ms": _round(_pct(lat, 50), 3),
            "p99_ms": _round(_pct(lat, 99), 3),
            "pg_cpu_us_per_command": _per_command_us(out.get("pg_cpu_seconds"), n),
            "rows_ok": rows == total,
        }

    def create_batches(self, impl: Impl) -> dict[str, Any]:
        dsn = self.fresh(impl.name, impl.template)
        n = self.args.commands
        out = self.client(impl.python, "create-batch", dsn, "--n", str(n))
        rows = self._count(dsn)
        if rows != n:
            self.failures.append(f"{impl.name} create_batch: {rows} rows, expected {n}")
        return {
            "commands": n,
            "batches": out["batches"],
            "rate": round(n / out["seconds"], 1),
            "pg_cpu_us_per_command": _per_command_us(out.get("pg_cpu_seconds"), n),
            "rows_ok": rows == n,
        }

    def end_to_end(self, impl: Impl, processes: int, concurrency: int) -> WorkRun:
        dsn = self.fresh(impl.name, impl.template)
        n = self.args.commands
        sent = self.client(impl.python, "batch", dsn, "--n", str(n))
        self.checkpoint()
        run = self.work(impl, dsn, processes, concurrency, n)
        run.send_batch_seconds = float(sent["seconds"])
        run.send_batch_pg_cpu_seconds = sent.get("pg_cpu_seconds")
        if not run.ok:
            self.failures.append(f"{impl.name} e2e {processes}x{concurrency}: {run.summary()}")
        return run

    def pickup(self, impl: Impl, concurrency: int) -> dict[str, Any]:
        dsn = self.fresh(impl.name, impl.template)
        n = self.args.pickup
        record = self.workdir / f"starts-{impl.name}.json"
        sent: dict[str, Any] = {}

        def send() -> None:
            out = self.client(
                impl.python,
                "pickup",
                dsn,
                "--n",
                str(n),
                "--interval",
                str(self.args.pickup_interval),
            )
            sent.update(out)

        total = n + 20  # _client.WARMUP_SENDS
        run = self.work(impl, dsn, 1, concurrency, total, record=record, during=send)
        if not run.ok:
            self.failures.append(f"{impl.name} pickup: {run.summary()}")
        starts: dict[str, float] = json.loads(record.read_text()) if record.exists() else {}
        lat = [
            (starts[cid] - t) * 1000.0 for cid, t in sent.get("sent", {}).items() if cid in starts
        ]
        return {
            "commands": n,
            "interval_ms": self.args.pickup_interval * 1000.0,
            "concurrency": concurrency,
            "measured": len(lat),
            "p50_ms": _round(_pct(lat, 50), 2),
            "p99_ms": _round(_pct(lat, 99), 2),
            "max_ms": _round(max(lat) if lat else None, 2),
            "ok": run.ok and len(lat) == n,
        }

    def raw(self) -> dict[str, Any]:
        n = self.args.commands
        payloads = [
            json.dumps(make_message(DOMAIN, uuid4(), make_data(i, self.args.payload_bytes)))
            for i in range(n)
        ]
        result: dict[str, Any] = {"commands": n}
        sends: list[float] = []
        send_cpu: list[float] = []
        for conns in (1, 4):
            dsn = self.fresh("raw", self.db_name("raw_tpl"))
            seconds, cpu = asyncio.run(_raw_send(dsn, payloads, self.cpu))
            sends.append(seconds)
            if cpu is not None:
                send_cpu.append(cpu)
            self.checkpoint()
            seconds, cpu, drained = asyncio.run(_raw_drain(dsn, conns, self.cpu))
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute(QUEUE_LENGTH).fetchone()
            left = int(row[0]) if row else -1
            ok = drained == n and left == 0
            if not ok:
                self.failures.append(f"raw drain x{conns}: drained {drained}/{n}, left {left}")
            result[f"drain_{conns}"] = {
                "connections": conns,
                "rate": round(n / seconds, 1),
                "pg_cpu_us_per_command": _per_command_us(cpu, n),
                "ok": ok,
            }
        median_send = statistics.median(sends)
        result["send_batch"] = {
            "chunk": RAW_SEND_CHUNK,
            "rate": round(n / median_send, 1),
            "pg_cpu_us_per_command": _per_command_us(
                statistics.median(send_cpu) if send_cpu else None, n
            ),
        }
        return result

    def _count(self, dsn: str) -> int:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM commandbus.command WHERE domain = %s", (DOMAIN,)
            ).fetchone()
        return int(row[0]) if row else -1


def _check_library(python: str, library: str | None) -> None:
    """Fail loudly if a subprocess imported the other library's `commandbus`."""
    ours = Path(commandbus.__file__).resolve().parent
    where = Path(library).resolve() if library else None
    is_ours = where is not None and where.is_relative_to(ours)
    if (python == sys.executable) != is_ours:
        raise RuntimeError(f"{python} imported commandbus from {library}")


async def _setup_ours(dsn: str) -> None:
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        await setup_database(conn)
        await conn.execute("SELECT commandbus.ensure_queue_v1(%s)", (QUEUE,))


def _delta(cpu: PgCpu, start: float | None) -> float | None:
    end = cpu.sample()
    return None if start is None or end is None else end - start


async def _raw_send(dsn: str, payloads: list[str], cpu: PgCpu) -> tuple[float, float | None]:
    """pgmq.send_batch in chunks: (seconds, PostgreSQL CPU seconds)."""
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        cpu0 = cpu.sample()
        t0 = time.perf_counter()
        for start in range(0, len(payloads), RAW_SEND_CHUNK):
            await conn.execute(
                "SELECT count(*) FROM pgmq.send_batch(%s, %s::jsonb[])",
                (QUEUE, payloads[start : start + RAW_SEND_CHUNK]),
            )
        return time.perf_counter() - t0, _delta(cpu, cpu0)


async def _raw_drain(dsn: str, connections: int, cpu: PgCpu) -> tuple[float, float | None, int]:
    """pgmq.read + pgmq.delete loops until the queue is empty: (seconds, PG CPU, messages)."""
    conns = [await AsyncConnection.connect(dsn, autocommit=True) for _ in range(connections)]

    async def drain(conn: AsyncConnection[Any]) -> int:
        n = 0
        while True:
            cur = await conn.execute(
                "SELECT msg_id, message FROM pgmq.read(%s, 30, %s)", (QUEUE, RAW_READ_QTY)
            )
            ids = [r[0] for r in await cur.fetchall()]
            if not ids:
                return n
            await conn.execute("SELECT pgmq.delete(%s, %s::bigint[])", (QUEUE, ids))
            n += len(ids)

    try:
        cpu0 = cpu.sample()
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(drain(c) for c in conns))
        return time.perf_counter() - t0, _delta(cpu, cpu0), sum(counts)
    finally:
        for c in conns:
            await c.close()


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _table(rows: list[tuple[str, str, float | None, float | None, float | None, int]]) -> str:
    head = f"{'metric':<46}{'better':>7}{'ours':>12}{'pred':>12}{'ours/pred':>11}"
    head += f"{'raw':>12}{'ours/raw':>10}"
    lines = [head, "-" * len(head)]
    for name, better, ours, pred, raw, digits in rows:
        lines.append(
            f"{name:<46}{better:>7}{_fmt(ours, digits):>12}{_fmt(pred, digits):>12}"
            f"{_fmt(_ratio(ours, pred), 2):>11}{_fmt(raw, digits):>12}"
            f"{_fmt(_ratio(ours, raw), 2):>10}"
        )
    return "\n".join(lines)


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    cur: Any = d
    for key in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


def _iter_csv(text: str) -> Iterator[int]:
    for part in text.split(","):
        value = int(part)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        yield value


def _csv(text: str) -> list[int]:
    return list(_iter_csv(text))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="rcmd throughput: this library vs reliable-cmd 0.2.2 vs PGMQ alone",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--commands", "-n", type=int, default=100_000, help="N, per bulk/e2e run")
    p.add_argument(
        "--concurrency",
        type=_csv,
        default=[16, 64, 256, 1024],
        help="comma-separated: 1-process sweep",
    )
    p.add_argument(
        "--processes", type=_csv, default=[1, 2, 4], help="comma-separated: worker processes"
    )
    p.add_argument("--payload-bytes", type=int, default=128, help="JSON size of `data`")
    p.add_argument("--single", type=int, default=1_000, help="one-at-a-time sends")
    p.add_argument("--pickup", type=int, default=300, help="sends of the pickup test")
    p.add_argument("--pickup-interval", type=float, default=0.01, help="seconds")
    p.add_argument("--pool-size", type=int, default=20, help="psycopg pool of each worker")
    p.add_argument("--repeat", type=int, default=1, help="runs of each e2e config (median)")
    p.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL") or None,
        help="server (role may CREATE DATABASE); default $DATABASE_URL, else embedded PG",
    )
    p.add_argument(
        "--pred-venv", type=Path, default=DEFAULT_PRED_VENV, help="venv for reliable-cmd 0.2.2"
    )
    p.add_argument("--skip-predecessor", action="store_true", help="ours and raw PGMQ only")
    p.add_argument("--timeout", type=float, default=900.0, help="per phase, seconds")
    p.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        type=_pg_setting,
        help="extra postgresql.conf setting of the embedded server (repeatable), e.g. "
        "shared_preload_libraries=pg_stat_statements,auto_explain",
    )
    return p


def _pg_setting(text: str) -> str:
    name, sep, _value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return text


def run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    pred_python: str | None = None
    patch_state = None
    if not args.skip_predecessor:
        python, patch_state = ensure_predecessor(args.pred_venv)
        pred_python = str(python)
    server: EmbeddedServer | None = None
    try:
        if args.dsn is None:
            _log("starting an embedded PostgreSQL server (pg_stat_statements preloaded)")
            server = EmbeddedServer(
                settings={
                    "shared_preload_libraries": "pg_stat_statements",
                    "pg_stat_statements.track": "all",
                    **dict(kv.split("=", 1) for kv in args.pg_setting),
                }
            ).start()
            admin_dsn = server.dsn
        else:
            admin_dsn = args.dsn
        bench = Bench(args, admin_dsn, server)
        try:
            return _run(bench, args, pred_python, patch_state, t_start)
        finally:
            bench.drop_all()
            shutil.rmtree(bench.workdir, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()


def _run(
    bench: Bench,
    args: argparse.Namespace,
    pred_python: str | None,
    patch_state: str | None,
    t_start: float,
) -> int:
    _log("creating template databases")
    bench.setup_templates(pred_python)
    impls = [Impl("ours", "rcmd (this repo)", sys.executable, bench.db_name("ours_tpl"))]
    if pred_python is not None:
        impls.append(Impl("pred", PREDECESSOR, pred_python, bench.db_name("pred_tpl")))
    res: dict[str, dict[str, Any]] = {impl.name: {} for impl in impls}

    # Interleaved phase by phase: the drift of a noisy machine hits both libraries alike.
    for mode in ("default", "conn"):
        for impl in impls:
            _log(f"{impl.name}: {args.single} single sends ({mode})")
            res[impl.name][f"send_{mode}"] = bench.single_sends(impl, mode == "conn")
    for impl in impls:
        _log(f"{impl.name}: create_batch of {args.commands}")
        res[impl.name]["create_batch"] = bench.create_batches(impl)

    # End-to-end: every configuration `--repeat` times (interleaved); the median run counts.
    every: dict[str, list[WorkRun]] = {impl.name: [] for impl in impls}
    runs: dict[str, list[WorkRun]] = {impl.name: [] for impl in impls}

    def measure(configs: list[tuple[int, dict[str, int]]]) -> None:
        found: dict[tuple[str, int], list[WorkRun]] = {}
        for rep in range(args.repeat):
            for p, conc in configs:
                for impl in impls:
                    c = conc[impl.name]
                    _log(
                        f"{impl.name}: send_batch {args.commands}, then {p} worker "
                        f"process{'es' if p > 1 else ''} x{c} (run {rep + 1}/{args.repeat})"
                    )
                    run = bench.end_to_end(impl, p, c)
                    every[impl.name].append(run)
                    found.setdefault((impl.name, p * 100_000 + c), []).append(run)
        for (name, _), candidates in found.items():
            runs[name].append(_median_run(candidates))

    measure([(1, {impl.name: c for impl in impls}) for c in args.concurrency])
    best: dict[str, int] = {}
    for impl in impls:
        rated = [r for r in runs[impl.name] if r.ok and r.rate]
        best[impl.name] = (
            max(rated, key=lambda r: r.rate or 0.0).concurrency if rated else args.concurrency[0]
        )
    measure([(p, dict(best)) for p in args.processes if p != 1])
    for impl in impls:
        _log(f"{impl.name}: pickup latency, {args.pickup} sends every {args.pickup_interval}s")
        res[impl.name]["pickup"] = bench.pickup(impl, best[impl.name])
    _log(f"raw PGMQ: send_batch {args.commands}, read+delete on 1 and 4 connections")
    raw = bench.raw()

    for impl in impls:
        r = res[impl.name]
        impl_runs = runs[impl.name]
        r["e2e"] = [run.summary() for run in impl_runs]
        r["best_concurrency"] = best[impl.name]
        batch_secs = [x.send_batch_seconds for x in every[impl.name] if x.send_batch_seconds]
        batch_cpu_ok = [
            x.send_batch_pg_cpu_seconds
            for x in every[impl.name]
            if x.send_batch_pg_cpu_seconds is not None
        ]
        r["send_batch"] = {
            "commands": args.commands,
            "runs": len(batch_secs),
            "rate": round(args.commands / statistics.median(batch_secs), 1) if batch_secs else None,
            "pg_cpu_us_per_command": _per_command_us(
                statistics.median(batch_cpu_ok) if batch_cpu_ok else None, args.commands
            ),
        }
        # Where PostgreSQL spends its time (pg_stat_statements, nested statements included):
        # the best single-process run and the run with the most processes.
        most = max(args.processes)
        r["top_statements"] = {
            f"{x.processes}x{x.concurrency}": x.statements
            for x in impl_runs
            if x.concurrency == best[impl.name] and x.processes in (1, most)
        }

    def e2e(name: str, processes: int, concurrency: int | None = None) -> dict[str, Any] | None:
        c = best.get(name) if concurrency is None else concurrency
        return next(
            (
                x
                for x in res.get(name, {}).get("e2e", [])
                if x["processes"] == processes and x["concurrency"] == c
            ),
            None,
        )

    ours, pred = res["ours"], res.get("pred")
    rows: list[tuple[str, str, float | None, float | None, float | None, int]] = [
        ("send one at a time (cmd/s)", "higher", _get(ours, "send_default", "rate"),
         _get(pred, "send_default", "rate"), None, 0),
        ("  latency p50 (ms)", "lower", _get(ours, "send_default", "p50_ms"),
         _get(pred, "send_default", "p50_ms"), None, 2),
        ("  latency p99 (ms)", "lower", _get(ours, "send_default", "p99_ms"),
         _get(pred, "send_default", "p99_ms"), None, 2),
        ("send conn= in caller's txn (cmd/s)", "higher", _get(ours, "send_conn", "rate"),
         _get(pred, "send_conn", "rate"), None, 0),
        ("  latency p50 (ms)", "lower", _get(ours, "send_conn", "p50_ms"),
         _get(pred, "send_conn", "p50_ms"), None, 2),
        ("send_batch, chunks of 1,000 (cmd/s)", "higher", _get(ours, "send_batch", "rate"),
         _get(pred, "send_batch", "rate"), _get(raw, "send_batch", "rate"), 0),
        ("create_batch of 1,000 each (cmd/s)", "higher", _get(ours, "create_batch", "rate"),
         _get(pred, "create_batch", "rate"), _get(raw, "send_batch", "rate"), 0),
    ]  # fmt: skip
    for c in args.concurrency:
        rows.append(
            (f"e2e, 1 process, concurrency {c} (cmd/s)", "higher",
             _get(e2e("ours", 1, c), "rate"), _get(e2e("pred", 1, c), "rate"),
             _get(raw, "drain_1", "rate"), 0)
        )  # fmt: skip
    for p in args.processes:
        raw_key = "drain_1" if p == 1 else "drain_4"
        rows.append(
            (f"e2e, {p} process{'es' if p > 1 else ''}, best concurrency (cmd/s)", "higher",
             _get(e2e("ours", p), "rate"), _get(e2e("pred", p), "rate"),
             _get(raw, raw_key, "rate"), 0)
        )  # fmt: skip
    rows += [
        (f"pickup, 1 send per {args.pickup_interval * 1000:g} ms, p50 (ms)", "lower",
         _get(ours, "pickup", "p50_ms"), _get(pred, "pickup", "p50_ms"), None, 2),
        ("  pickup p99 (ms)", "lower", _get(ours, "pickup", "p99_ms"),
         _get(pred, "pickup", "p99_ms"), None, 2),
        ("PG CPU/cmd, e2e 1 process best (us)", "lower",
         _get(e2e("ours", 1), "pg_cpu_us_per_command"),
         _get(e2e("pred", 1), "pg_cpu_us_per_command"),
         _get(raw, "drain_1", "pg_cpu_us_per_command"), 1),
        ("PG CPU/cmd, send_batch (us)", "lower", _get(ours, "send_batch", "pg_cpu_us_per_command"),
         _get(pred, "send_batch", "pg_cpu_us_per_command"),
         _get(raw, "send_batch", "pg_cpu_us_per_command"), 1),
        ("PG CPU/cmd, send one at a time (us)", "lower",
         _get(ours, "send_default", "pg_cpu_us_per_command"),
         _get(pred, "send_default", "pg_cpu_us_per_command"), None, 1),
        ("worker CPU/cmd, e2e 1 process best (us)", "lower",
         _get(e2e("ours", 1), "worker_cpu_us_per_command"),
         _get(e2e("pred", 1), "worker_cpu_us_per_command"), None, 1),
        ("worker peak RSS, 1 process best (MB)", "lower",
         _get(e2e("ours", 1), "worker_peak_rss_mb"),
         _get(e2e("pred", 1), "worker_peak_rss_mb"), None, 1),
    ]  # fmt: skip

    ratios = {
        "send_rate_ours_over_pred": _ratio(
            _get(ours, "send_default", "rate"), _get(pred, "send_default", "rate")
        ),
        "send_p50_ours_over_pred": _ratio(
            _get(ours, "send_default", "p50_ms"), _get(pred, "send_default", "p50_ms")
        ),
        "send_batch_ours_over_pred": _ratio(
            _get(ours, "send_batch", "rate"), _get(pred, "send_batch", "rate")
        ),
        "create_batch_ours_over_pred": _ratio(
            _get(ours, "create_batch", "rate"), _get(pred, "create_batch", "rate")
        ),
        "send_batch_ours_over_raw": _ratio(
            _get(ours, "send_batch", "rate"), _get(raw, "send_batch", "rate")
        ),
        "pickup_p50_ours_over_pred": _ratio(
            _get(ours, "pickup", "p50_ms"), _get(pred, "pickup", "p50_ms")
        ),
        "pickup_p99_ours_over_pred": _ratio(
            _get(ours, "pickup", "p99_ms"), _get(pred, "pickup", "p99_ms")
        ),
    }
    for p in args.processes:
        ours_rate = _get(e2e("ours", p), "rate")
        ratios[f"e2e_{p}p_ours_over_pred"] = _ratio(ours_rate, _get(e2e("pred", p), "rate"))
        raw_key = "drain_1" if p == 1 else "drain_4"
        ratios[f"e2e_{p}p_ours_over_raw_{raw_key}"] = _ratio(ours_rate, _get(raw, raw_key, "rate"))

    hardware = {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "postgresql": bench.server_version,
        "server": "embedded" if bench.server is not None else "dsn",
        "pgmq_install": bench.pgmq_install,
        "python": platform.python_version(),
    }
    settings = {
        "commands": args.commands,
        "concurrency": args.concurrency,
        "processes": args.processes,
        "payload_bytes": args.payload_bytes,
        "single": args.single,
        "pickup": args.pickup,
        "pickup_interval": args.pickup_interval,
        "pool_size": args.pool_size,
        "repeat": args.repeat,
    }
    ok = not bench.failures
    print(
        f"rcmd throughput: N={args.commands}, payload {args.payload_bytes} B, "
        f"{hardware['nproc']} x {hardware['cpu']}, PostgreSQL {hardware['postgresql']} "
        f"({hardware['server']}), best concurrency ours={best.get('ours')} "
        f"pred={best.get('pred')}"
    )
    print(_table(rows))
    print(
        f"verification: {'all runs OK' if ok else 'FAILED: ' + '; '.join(bench.failures)}"
        f" ({time.monotonic() - t_start:.0f} s)"
    )
    print(
        json.dumps(
            {
                "benchmark": "rcmd-throughput",
                "version": 1,
                "hardware": hardware,
                "settings": settings,
                "predecessor": {
                    "package": PREDECESSOR,
                    "patch": patch_state,
                    "setup": bench.pred_setup,
                }
                if pred_python
                else None,
                "ours": ours,
                "pred": pred,
                "raw": raw,
                "ratios": ratios,
                "ok": ok,
                "failures": bench.failures,
                "seconds": round(time.monotonic() - t_start, 1),
            }
        )
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
