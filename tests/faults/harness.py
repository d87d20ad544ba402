"""The fault rig: an embedded PostgreSQL, a fault proxy, two worker processes and a sender.

Used by tests/faults/test_faults.py (one repetition of each fault) and benches/faults.py (many).

    with FaultRig(workdir) as rig:
        result = rig.run("terminate", rep=1)   # one repetition: load, fault, recovery, checks
        assert result.clean

One repetition:
1. a sender process (direct to the server) sends continuously, every command with `reply_to`,
   in `send_batch` calls and `create_batch` batches; the two worker processes reach the server
   through the proxy and print their engine's counters every 0.2 s;
2. baseline: the rate of flushed outcomes (the workers' `applied` counters) over 2 s;
3. the fault (FAULTS below); it ends at a moment `fault_end`;
4. recovery: the time from `fault_end` to the start of the first 1 s window in which the workers
   flushed at least half the baseline rate (load keeps coming, so a backlog does not hide a
   stall); not recovered within `recovery_limit` -> `recovery_s` None, and the workers are then
   killed and started again (the proxy reset) so the rest of the checks can still run;
5. the sender stops; every command it sent must become COMPLETED or FAILED (a business-rule
   failure, one in ten) within `drain_limit`;
6. checks over the ids of this repetition (the sender's ACKs, plus its failed calls' ids that
   are in the database): lost (acknowledged but not in the database, or not finished, or
   finished without a terminal audit row), finished twice (more than one terminal audit row),
   duplicate and missing replies, batch counters against a recount, and messages left
   invisible (vt further ahead than the visibility timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import psycopg
from psycopg import sql

from commandbus import setup_database
from commandbus.embedded import EmbeddedServer, create_database, install_pgmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import FaultProxy

LOAD = Path(__file__).with_name("load.py")
DOMAIN = "faults"
REPLY_QUEUE = "faults__replies"
COMMAND_QUEUE = f"{DOMAIN}__commands"
BATCH_FLAG = 1 << 31
TERMINAL_STATUSES = ("COMPLETED", "FAILED")
TERMINAL_EVENTS = ("COMPLETED", "BUSINESS_RULE_FAILED")

#: the fault kinds, in the order of the table
FAULTS = ("sigkill", "restart", "terminate", "slots", "lock", "freeze", "latency")
FAULT_TITLES = {
    "sigkill": "worker SIGKILLed",
    "restart": "PostgreSQL restarted (immediate)",
    "terminate": "every backend terminated",
    "slots": "connection slots exhausted",
    "lock": "transaction holding table locks",
    "freeze": "connections go silent (proxy freeze)",
    "latency": "latency on every packet",
}


@dataclass
class RepResult:
    """The outcome of one repetition of one fault."""

    fault: str
    rep: int
    commands: int = 0  # commands of this repetition in the database
    unsure: int = 0  # ids of failed send calls (outcome unknown to the sender)
    lost: int = 0
    finished_twice: int = 0
    duplicate_replies: int = 0
    missing_replies: int = 0
    counter_errors: int = 0
    invisible: int = 0
    baseline_rate: float = 0.0
    fault_rate: float = 0.0  # outcomes flushed a second while the fault lasted (0: a stall)
    fault_s: float = 0.0  # how long the fault lasted
    recovery_s: float | None = None
    workers_restarted: bool = False
    worker_exits: int = 0  # worker processes that exited on their own (not the SIGKILLed one)
    details: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return (
            self.lost
            + self.finished_twice
            + self.duplicate_replies
            + self.missing_replies
            + self.counter_errors
            + self.invisible
            + self.worker_exits
        )

    def line(self) -> str:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        return (
            f"{self.fault} #{self.rep}: {self.commands} commands ({self.unsure} unsure), lost"
            f" {self.lost}, twice {self.finished_twice}, dup replies {self.duplicate_replies},"
            f" missing replies {self.missing_replies}, counter errors {self.counter_errors},"
            f" invisible {self.invisible}, baseline {self.baseline_rate:.0f}/s, during the"
            f" fault ({self.fault_s:.1f}s) {self.fault_rate:.0f}/s, recovery {rec}"
            + (" (workers restarted)" if self.workers_restarted else "")
            + (f", {self.worker_exits} worker exits" if self.worker_exits else "")
        )


class _Progress:
    """Flushed outcomes over time, summed over every worker process (killed ones included)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0
        self._samples: list[tuple[float, int]] = [(time.monotonic(), 0)]

    def add(self, delta: int) -> None:
        with self._lock:
            self._total += max(0, delta)
            self._samples.append((time.monotonic(), self._total))

    def at(self, t: float) -> int:
        """The total at monotonic time t (the last sample at or before it)."""
        with self._lock:
            samples = self._samples
            lo, hi = 0, len(samples)
            while lo < hi:
                mid = (lo + hi) // 2
                if samples[mid][0] <= t:
                    lo = mid + 1
                else:
                    hi = mid
            return samples[lo - 1][1] if lo else 0

    def rate(self, t0: float, t1: float) -> float:
        return (self.at(t1) - self.at(t0)) / (t1 - t0)


class _Proc:
    """A load.py process and the stdout lines it printed (read by a thread)."""

    def __init__(
        self, args: list[str], log: Path, on_line: Callable[[str], None] | None = None
    ) -> None:
        self.log = log
        with log.open("ab") as err:
            self.popen = subprocess.Popen(
                [sys.executable, str(LOAD), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.lines: list[str] = []
        self._on_line = on_line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; True when it stopped on SIGTERM."""
        if self.popen.poll() is not None:
            self._finish()
            return True
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
            stopped = True
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            stopped = False
        self._finish()
        return stopped

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self._finish()

    def _finish(self) -> None:
        self._reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-2000:]


class _Worker(_Proc):
    def __init__(self, rig: FaultRig, name: str) -> None:
        self.name = name
        self._applied = 0
        self._progress = rig.progress
        super().__init__(
            [
                "worker", rig.worker_dsn, DOMAIN,
                "--concurrency", str(rig.concurrency), "--vt", str(rig.vt),
            ],
            rig.workdir / f"{name}.log",
            self._line,
        )  # fmt: skip

    def _line(self, line: str) -> None:
        if line.startswith("STATS "):
            applied = int(json.loads(line[6:]).get("applied", 0))
            self._progress.add(applied - self._applied)
            self._applied = applied


class FaultRig:
    """The server, the proxy and the two workers, kept across repetitions.

    Args:
        workdir: where the processes' logs go.
        rate: commands a second the sender sends.
        concurrency: of each worker.
        vt: the workers' visibility timeout (seconds): a killed worker's leases come back
            after it.
        hold: how long a fault with a duration (slots, lock, latency) lasts, seconds.
        latency_ms: the latency added by the latency fault.
        recovery_limit: longest wait for throughput to come back, seconds.
        drain_limit: longest wait for every command to finish after the sender stopped.
        max_connections: of the server (the slots fault fills them all).
        log: called with progress lines.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        rate: int = 200,
        concurrency: int = 32,
        vt: int = 5,
        hold: float = 3.0,
        latency_ms: float = 20.0,
        recovery_limit: float = 30.0,
        drain_limit: float = 60.0,
        max_connections: int = 50,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.rate = rate
        self.concurrency = concurrency
        self.vt = vt
        self.hold = hold
        self.latency_ms = latency_ms
        self.recovery_limit = recovery_limit
        self.drain_limit = drain_limit
        self.max_connections = max_connections
        self._log = log or (lambda _line: None)
        self.progress = _Progress()
        self.server: EmbeddedServer | None = None
        self.proxy: FaultProxy | None = None
        self.workers: list[_Worker] = []
        self.dsn = ""
        self.worker_dsn = ""
        self._spawned = 0
        self._kill_next = 0

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # durable: with synchronous_commit off an immediate restart loses acknowledged commits
        # (40 commands of 680 in a trial run); on the /dev/shm tmpfs fsync costs nothing.
        self.server = EmbeddedServer(
            max_connections=self.max_connections, durable=True, in_memory=True
        ).start()
        self.dsn = create_database(self.server.dsn, "faults")
        install_pgmq(self.dsn)

        async def setup() -> None:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await setup_database(conn)
                await conn.execute("SELECT pgmq.create(%s)", (REPLY_QUEUE,))

        asyncio.run(setup())
        self.proxy = FaultProxy("127.0.0.1", self.server.port).start()
        self.worker_dsn = self.proxy.dsn(self.dsn)
        self.workers = [self._spawn(), self._spawn()]
        return self

    def close(self) -> None:
        for w in self.workers:
            w.stop(5)
        self.workers = []
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _spawn(self) -> _Worker:
        self._spawned += 1
        return _Worker(self, f"worker{self._spawned}")

    def restart_workers(self) -> list[str]:
        """Stop (SIGKILL after 5 s) and start both workers again, the proxy reset; the names of
        the workers that did not stop on SIGTERM."""
        stuck = [w.name for w in self.workers if not w.stop(5)]
        assert self.proxy is not None
        self.proxy.reset()
        self.workers = [self._spawn(), self._spawn()]
        return stuck

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)

    # -- one repetition --------------------------------------------------------------------

    def run(self, fault: str, rep: int) -> RepResult:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (one of {', '.join(FAULTS)})")
        result = RepResult(fault, rep)
        assert self.proxy is not None
        self.proxy.reset()
        self._replace_exited(result)
        base = (uuid.uuid4().int >> 32) << 32
        sender = _Proc(
            ["sender", self.dsn, DOMAIN, REPLY_QUEUE, f"{base:x}", "--rate", str(self.rate)],
            self.workdir / f"sender-{fault}-{rep}.log",
        )
        try:
            self._wait_for(lambda: any(ln.startswith("ACK") for ln in sender.lines), 60, sender)
            time.sleep(2.5)  # warm-up: the workers take the load
            now = time.monotonic()
            result.baseline_rate = self.progress.rate(now - 2.0, now)
            if result.baseline_rate <= 0:
                raise RuntimeError(
                    "no throughput before the fault\n" + "\n".join(w.tail() for w in self.workers)
                )
            self._log(f"{fault} #{rep}: baseline {result.baseline_rate:.0f}/s, fault starts")
            fault_start = time.monotonic()
            fault_end = getattr(self, f"_fault_{fault}")()
            result.fault_s = round(fault_end - fault_start, 2)
            if result.fault_s >= 0.5:
                result.fault_rate = self.progress.rate(fault_start, fault_end)
            result.recovery_s = self._recovery(fault_end, result.baseline_rate)
            self._log(f"{fault} #{rep}: recovery {result.recovery_s}")
        finally:
            if not sender.stop(30):
                result.details.append("the sender did not stop on SIGTERM within 30 s")
        if result.recovery_s is None:
            result.workers_restarted = True
            stuck = self.restart_workers()
            if stuck:
                result.details.append(
                    f"not stopped by SIGTERM within 5 s (SIGKILLed): {', '.join(stuck)}"
                )
        self._check(result, base, sender)
        self._replace_exited(result)
        self.proxy.reset()
        return result

    def _replace_exited(self, result: RepResult) -> None:
        """Count and replace the workers that exited on their own."""
        for i, w in enumerate(self.workers):
            if not w.alive:
                result.worker_exits += 1
                result.details.append(f"{w.name} exited ({w.popen.returncode}): {w.tail()[-500:]}")
                w.stop(0)
                self.workers[i] = self._spawn()

    def _wait_for(self, cond: Callable[[], bool], timeout: float, proc: _Proc) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline or not proc.alive:
                raise RuntimeError(f"load process not ready: {proc.lines[-5:]}\n{proc.tail()}")
            time.sleep(0.05)

    def _recovery(self, fault_end: float, baseline: float) -> float | None:
        """Seconds from fault_end to the start of the first 1 s window at >= baseline / 2."""
        start = fault_end
        while start <= fault_end + self.recovery_limit:
            while time.monotonic() < start + 1.0:
                time.sleep(0.05)
            if self.progress.rate(start, start + 1.0) >= baseline / 2:
                return round(start - fault_end, 2)
            start += 0.2
        return None

    # -- the faults (each returns the monotonic time the fault ended) ------------------------

    def _fault_sigkill(self) -> float:
        i = self._kill_next % len(self.workers)
        self._kill_next += 1
        victim = self.workers[i]
        victim.popen.send_signal(signal.SIGKILL)
        end = time.monotonic()
        victim.kill()  # reap
        if victim.popen.returncode != -signal.SIGKILL:
            raise RuntimeError(f"sigkill: {victim.name} exited {victim.popen.returncode}")
        self.workers[i] = self._spawn()
        return end

    def _postmaster_started(self) -> Any:
        with self._admin() as conn:
            row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        return row[0] if row else None

    def _fault_restart(self) -> float:
        assert self.server is not None
        before = self._postmaster_started()
        self.server.restart("immediate")
        end = time.monotonic()
        if self._postmaster_started() == before:
            raise RuntimeError("restart: the server was not restarted")
        return end

    def _fault_terminate(self) -> float:
        with self._admin() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            ).fetchall()
        end = time.monotonic()
        if not any(r[0] for r in rows):
            raise RuntimeError("terminate: no backend was terminated")
        return end

    def _fault_slots(self) -> float:
        """Take every connection slot (superuser ones included), then terminate the backends
        of the database so the workers need new ones, and keep every freed slot for `hold`."""
        held: list[psycopg.Connection[Any]] = []
        admin = self._admin()
        held.append(admin)

        refused = 0

        def grab() -> None:
            nonlocal refused
            while True:
                try:
                    held.append(psycopg.connect(self.dsn, autocommit=True, connect_timeout=5))
                except psycopg.OperationalError as exc:
                    text = str(exc)
                    if "too many clients" not in text and "connection slots" not in text:
                        raise
                    refused += 1
                    return

        try:
            grab()
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend' AND pid <> ALL(%s)",
                ([c.info.backend_pid for c in held],),
            )
            deadline = time.monotonic() + self.hold
            while time.monotonic() < deadline:
                grab()
                time.sleep(0.05)
            self._log(f"slots: held {len(held)} connections")
        finally:
            for c in held:
                with contextlib.suppress(Exception):
                    c.close()
        end = time.monotonic()
        if not refused:
            raise RuntimeError("slots: the server never refused a connection")
        return end

    def _fault_lock(self) -> float:
        """A transaction holding EXCLUSIVE locks (writes and row locks wait; reads pass) on the
        command table and the command queue's table for `hold` seconds."""
        with self._admin() as conn:
            with conn.transaction():
                conn.execute(
                    sql.SQL(
                        "LOCK TABLE commandbus.command, commandbus.batch, {} IN EXCLUSIVE MODE"
                    ).format(sql.Identifier("pgmq", f"q_{COMMAND_QUEUE}"))
                )
                time.sleep(self.hold)
            return time.monotonic()

    def _fault_freeze(self) -> float:
        assert self.proxy is not None
        frozen = self.proxy.freeze()
        end = time.monotonic()
        self._log(f"freeze: {frozen} connections frozen")
        if not frozen:
            raise RuntimeError("freeze: no connection was open through the proxy")
        return end

    def _fault_latency(self) -> float:
        assert self.proxy is not None
        self.proxy.add_latency(self.latency_ms)
        time.sleep(self.hold)
        self.proxy.add_latency(0)
        return time.monotonic()

    # -- the checks ------------------------------------------------------------------------

    def _check(self, result: RepResult, base: int, sender: _Proc) -> None:
        acked: list[UUID] = []
        unsure: list[UUID] = []
        acked_batches: list[UUID] = []
        for line in sender.lines:
            kind, *rest = line.split()
            if kind not in ("ACK", "ERR"):
                continue
            first, last = int(rest[0]), int(rest[1])
            ids = [UUID(int=base | i) for i in range(first, last + 1)]
            (acked if kind == "ACK" else unsure).extend(ids)
            if kind == "ACK" and len(rest) == 3:
                acked_batches.append(UUID(int=base | BATCH_FLAG | int(rest[2])))
        result.unsure = len(unsure)
        every = acked + unsure
        with self._admin() as conn:
            status = self._drain(conn, every)
            result.commands = len(status)
            missing = [i for i in acked if i not in status]
            unfinished = {i: s for i, s in status.items() if s not in TERMINAL_STATUSES}
            if missing:
                result.details.append(f"acknowledged but not in the database: {missing[:5]}")
            if unfinished:
                result.details.append(f"not finished: {list(unfinished.items())[:5]}")
            terminal = dict(
                conn.execute(
                    "SELECT command_id, count(*) FROM commandbus.audit"
                    " WHERE command_id = ANY(%s) AND event_type = ANY(%s) GROUP BY command_id",
                    (list(status), list(TERMINAL_EVENTS)),
                ).fetchall()
            )
            finished = [i for i, s in status.items() if s in TERMINAL_STATUSES]
            no_audit = [i for i in finished if terminal.get(i, 0) == 0]
            twice = [i for i, n in terminal.items() if n > 1]
            if no_audit:
                result.details.append(f"finished without a terminal audit row: {no_audit[:5]}")
            if twice:
                result.details.append(f"finished twice: {twice[:5]}")
            result.lost = len(missing) + len(unfinished) + len(no_audit)
            result.finished_twice = len(twice)
            replies = dict(
                conn.execute(
                    sql.SQL(
                        "SELECT (message->>'command_id')::uuid, count(*) FROM {}"
                        " WHERE message->>'command_id' = ANY(%s) GROUP BY 1"
                    ).format(sql.Identifier("pgmq", f"q_{REPLY_QUEUE}")),
                    ([str(i) for i in status],),
                ).fetchall()
            )
            dup = [i for i, n in replies.items() if n > 1]
            no_reply = [i for i in finished if replies.get(i, 0) == 0]
            if dup:
                result.details.append(f"duplicate replies: {dup[:5]}")
            if no_reply:
                result.details.append(f"finished without a reply: {no_reply[:5]}")
            result.duplicate_replies = len(dup)
            result.missing_replies = len(no_reply)
            result.counter_errors = self._check_batches(conn, acked_batches, result)
            invisible = conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM {} WHERE vt > now() + make_interval(secs => %s)"
                ).format(sql.Identifier("pgmq", f"q_{COMMAND_QUEUE}")),
                (self.vt + 5,),
            ).fetchone()
            result.invisible = int(invisible[0]) if invisible else 0
            if result.invisible:
                result.details.append(f"{result.invisible} messages invisible beyond the vt")

    def _drain(self, conn: psycopg.Connection[Any], ids: list[UUID]) -> dict[UUID, str]:
        """Wait until every command of `ids` in the database is finished; their statuses."""
        deadline = time.monotonic() + self.drain_limit
        while True:
            rows = conn.execute(
                "SELECT command_id, status FROM commandbus.command"
                " WHERE domain = %s AND command_id = ANY(%s)",
                (DOMAIN, ids),
            ).fetchall()
            status: dict[UUID, str] = {r[0]: r[1] for r in rows}
            if all(s in TERMINAL_STATUSES for s in status.values()):
                return status
            if time.monotonic() > deadline:
                return status
            time.sleep(0.25)

    def _check_batches(
        self, conn: psycopg.Connection[Any], batch_ids: list[UUID], result: RepResult
    ) -> int:
        """Batches whose counters or status differ from a recount of their commands."""
        rows = conn.execute(
            """
            SELECT b.batch_id, b.status, b.total_count, b.completed_count, b.failed_count,
                   b.canceled_count, b.in_troubleshooting_count,
                   count(c.command_id),
                   count(*) FILTER (WHERE c.status = 'COMPLETED'),
                   count(*) FILTER (WHERE c.status = 'FAILED'),
                   count(*) FILTER (WHERE c.status = 'CANCELED'),
                   count(*) FILTER (WHERE c.status = 'IN_TROUBLESHOOTING_QUEUE')
            FROM commandbus.batch b
            LEFT JOIN commandbus.command c ON c.domain = b.domain AND c.batch_id = b.batch_id
            WHERE b.domain = %s AND b.batch_id = ANY(%s)
            GROUP BY b.domain, b.batch_id
            """,
            (DOMAIN, batch_ids),
        ).fetchall()
        errors = len(set(batch_ids) - {r[0] for r in rows})
        if errors:
            result.details.append(f"{errors} acknowledged batches not in the database")
        for r in rows:
            stored, recount = r[2:7], (r[7], *r[8:12])
            done = recount[1] + recount[2] + recount[3] == recount[0]
            want = (
                ("COMPLETED" if recount[2] + recount[3] == 0 else "COMPLETED_WITH_FAILURES")
                if done
                else "IN_PROGRESS"
            )
            if tuple(stored) != tuple(recount) or r[1] != want:
                errors += 1
                result.details.append(
                    f"batch {r[0]}: {r[1]} {tuple(stored)}, recount {want} {tuple(recount)}"
                )
        return errors


def table(results: list[RepResult], recovery_target: float = 30.0) -> str:
    """The README table: one row per fault kind (markdown)."""
    lines = [
        "| fault | repetitions | lost | finished twice | duplicate replies | counter errors"
        " | missing replies / left invisible | recovery (median / max) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for fault in FAULTS:
        runs = [r for r in results if r.fault == fault]
        if not runs:
            continue
        recs = sorted(r.recovery_s for r in runs if r.recovery_s is not None)
        not_rec = len(runs) - len(recs)
        rec = f"{recs[len(recs) // 2]:.1f} s / {recs[-1]:.1f} s" if recs else "-"
        if not_rec:
            rec += f"; not back within {recovery_target:.0f} s in {not_rec}"
        lines.append(
            f"| {FAULT_TITLES[fault]} | {len(runs)} | {sum(r.lost for r in runs)}"
            f" | {sum(r.finished_twice for r in runs)} | {sum(r.duplicate_replies for r in runs)}"
            f" | {sum(r.counter_errors for r in runs)}"
            f" | {sum(r.missing_replies for r in runs)} / {sum(r.invisible for r in runs)}"
            f" | {rec} |"
        )
    return "\n".join(lines)
