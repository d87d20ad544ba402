"""Connections that go silent (issue 15): two worker processes reach PostgreSQL through a TCP
proxy (tests/faults/proxy.py) that, mid-run, stops forwarding on the connections open at that
moment without closing them (a stuck pgbouncer or cloud SQL proxy, a NAT drop, a failover
without resets); new connections pass.

a. Frozen both ways: the engine's calls on those connections get no answer; each is abandoned
   at its deadline and the workers go on with fresh connections: progress resumes within 30 s,
   every command finishes exactly once (one COMPLETED audit row, one reply, batch counters
   equal to a recount, nothing left in the queue).
b. Only the answers frozen: the flushes reach the server and commit, the workers never hear
   back (outcome unknown). The retried flush is fenced (the `fenced` counter proves the retry
   met already-applied outcomes), and still every command finishes exactly once.
c. SIGTERM during the freeze: the worker exits within its stop timeout (not the call deadline,
   not never); what it could not flush or release is redelivered to another worker and
   finishes exactly once.

The default run uses a 3 s call deadline and short leases to stay within its budget (about 30 s
for the three); the long variants run with the defaults (10 s deadline, 30 s leases) and 20,000
commands: `RCMD_FAULTS_LONG=1 pytest tests/faults -m slow`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from proxy import FaultProxy
from psycopg_pool import AsyncConnectionPool

from commandbus import BatchCommand, CommandBus, SendRequest

pytestmark = [pytest.mark.timeout(240)]

HELPER = Path(__file__).with_name("fault_worker.py")
DOMAIN = "fault"
COMMAND_TYPE = "Fault"  # the type fault_worker.py registers
REPLY_QUEUE = "fault__replies"
#: the issue's bound: workers resume on their own within this many seconds of the freeze
RESUME_WITHIN = 30.0

logger = logging.getLogger(__name__)


class WorkerProcess:
    """One fault_worker.py process: its stdout lines, stderr log, and how to stop it."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, stderr: Path) -> None:
        self.proc = proc
        self.name = name
        self.stderr = stderr
        self.lines: list[str] = []

    @classmethod
    async def start(cls, tmp_path: Path, name: str, dsn: str, *args: str) -> WorkerProcess:
        stderr = tmp_path / f"{name}.stderr"
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HELPER), dsn, DOMAIN, *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        worker = cls(proc, name, stderr)
        await worker.expect("READY", 30.0)
        return worker

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def diagnostics(self) -> str:
        return f"{self.name} (rc={self.proc.returncode}) stdout={self.lines}\n{self.log()[-3000:]}"

    async def expect(self, word: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if line == word or line.startswith(word + " "):
                    return line[len(word) + 1 :]
            try:
                raw = await asyncio.wait_for(
                    self.proc.stdout.readline(), max(0.01, deadline - time.monotonic())
                )
            except TimeoutError:
                pytest.fail(f"no {word!r} within {timeout} s\n{self.diagnostics()}")
            if not raw:
                pytest.fail(f"exited before {word!r}\n{self.diagnostics()}")
            self.lines.append(raw.decode().rstrip("\n"))

    async def terminate(self, timeout: float) -> tuple[float, dict[str, Any]]:
        """SIGTERM; returns (seconds until the process exited, its STATS)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        stats = json.loads(await self.expect("STATS", timeout))
        try:
            rc = await asyncio.wait_for(
                self.proc.wait(), max(0.5, timeout - (time.monotonic() - t0))
            )
        except TimeoutError:
            pytest.fail(f"did not exit within {timeout} s of SIGTERM\n{self.diagnostics()}")
        elapsed = time.monotonic() - t0
        assert rc == 0, self.diagnostics()
        return elapsed, stats

    async def aclose(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


@pytest.fixture
def proxy(database_url: str) -> Iterator[FaultProxy]:
    try:
        p = FaultProxy.for_dsn(database_url)
    except ValueError as exc:  # a Unix-socket DATABASE_URL: nothing to put a proxy in front of
        pytest.skip(f"needs a TCP database URL: {exc}")
    with p:
        yield p


async def send_workload(pool: AsyncConnectionPool[Any], n: int) -> tuple[list[UUID], list[UUID]]:
    """`n` commands: half plain, half in batches of 100 with replies; max_attempts 10, so
    redeliveries caused by the fault never exhaust a command. Returns (command ids, batch ids)."""
    bus = CommandBus(pool)
    ids: list[UUID] = []
    batches: list[UUID] = []
    try:
        plain = [
            SendRequest(DOMAIN, COMMAND_TYPE, uuid.uuid4(), {"i": i}, max_attempts=10)
            for i in range(n // 2)
        ]
        await bus.send_batch(plain)
        ids += [r.command_id for r in plain]
        for start in range(n // 2, n, 100):
            members = [
                BatchCommand(
                    COMMAND_TYPE, uuid.uuid4(), {"i": i}, reply_to=REPLY_QUEUE, max_attempts=10
                )
                for i in range(start, min(n, start + 100))
            ]
            result = await bus.create_batch(DOMAIN, members)
            batches.append(result.batch_id)
            ids += [m.command_id for m in members]
    finally:
        await bus.close()
    return ids, batches


async def scalar(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> Any:
    async with pool.connection() as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def completed(pool: AsyncConnectionPool[Any]) -> int:
    return int(
        await scalar(
            pool,
            "SELECT count(*) FROM commandbus.command WHERE domain = %s AND status = 'COMPLETED'",
            DOMAIN,
        )
    )


async def wait_for_completed(
    pool: AsyncConnectionPool[Any], count: int, timeout: float, *procs: WorkerProcess
) -> float:
    """Seconds until at least `count` commands are COMPLETED (fails after `timeout`)."""
    t0 = time.monotonic()
    while (done := await completed(pool)) < count:
        if time.monotonic() - t0 > timeout:
            details = "\n".join(p.diagnostics() for p in procs)
            pytest.fail(f"{done} of {count} completed after {timeout} s\n{details}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def assert_exactly_once(
    pool: AsyncConnectionPool[Any], ids: list[UUID], batches: list[UUID]
) -> None:
    """Every command COMPLETED, one COMPLETED audit row and (batch members) one reply each,
    batch counters equal to a recount, no message left in the command queue."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status, count(*) FROM commandbus.command WHERE domain = %s GROUP BY status",
            (DOMAIN,),
        )
        assert dict(await cur.fetchall()) == {"COMPLETED": len(ids)}
        cur = await conn.execute(
            "SELECT command_id, count(*) FROM commandbus.audit"
            " WHERE domain = %s AND event_type = 'COMPLETED' GROUP BY command_id",
            (DOMAIN,),
        )
        audit = dict(await cur.fetchall())
        assert set(audit) == set(ids)
        assert {k: v for k, v in audit.items() if v != 1} == {}, "completed twice"
        cur = await conn.execute(
            f"SELECT message->>'command_id', count(*) FROM pgmq.q_{REPLY_QUEUE} GROUP BY 1"
        )
        replies = dict(await cur.fetchall())
        members = await (
            await conn.execute(
                "SELECT count(*) FROM commandbus.command"
                " WHERE domain = %s AND batch_id IS NOT NULL",
                (DOMAIN,),
            )
        ).fetchone()
        assert members is not None
        assert len(replies) == members[0]
        assert {k: v for k, v in replies.items() if v != 1} == {}, "duplicate replies"
        cur = await conn.execute(
            "SELECT b.batch_id, b.status, b.total_count, b.completed_count,"
            " (SELECT count(*) FROM commandbus.command c WHERE c.domain = b.domain"
            "  AND c.batch_id = b.batch_id AND c.status = 'COMPLETED')"
            " FROM commandbus.batch b WHERE b.domain = %s",
            (DOMAIN,),
        )
        rows = await cur.fetchall()
        assert {r[0] for r in rows} == set(batches)
        for batch_id, status, total, done, recount in rows:
            assert (status, done) == ("COMPLETED", total), batch_id
            assert done == recount, batch_id
        cur = await conn.execute(f"SELECT count(*) FROM pgmq.q_{DOMAIN}__commands")
        left = await cur.fetchone()
        assert left is not None and left[0] == 0


async def run_freeze(
    pool: AsyncConnectionPool[Any],
    database_url: str,
    proxy: FaultProxy,
    tmp_path: Path,
    *,
    direction: str,
    n: int,
    call_timeout: float,
    vt: int,
) -> list[dict[str, Any]]:
    """The scenario of a. and b.; returns the workers' STATS."""
    ids, batches = await send_workload(pool, n)
    args = ["--concurrency", "32", "--vt", str(vt), "--call-timeout", str(call_timeout)]
    args += ["--handler-ms", "30", "--stop-timeout", "10"]
    dsn = proxy.dsn(database_url)
    procs: list[WorkerProcess] = []
    try:
        for name in ("w1", "w2"):
            procs.append(await WorkerProcess.start(tmp_path, name, dsn, *args))
        await wait_for_completed(pool, n // 8, 60.0, *procs)
        frozen = proxy.freeze(direction)  # type: ignore[arg-type]
        assert frozen >= 4, "both workers' connections go through the proxy"
        at_freeze = await completed(pool)
        resumed = await wait_for_completed(pool, at_freeze + n // 20, RESUME_WITHIN, *procs)
        assert resumed < RESUME_WITHIN
        logger.warning("freeze %s: work resumed %.1f s after the freeze", direction, resumed)
        await wait_for_completed(pool, n, 120.0, *procs)
        stats = [(await p.terminate(15.0))[1] for p in procs]
        logs = "\n".join(p.log() for p in procs)
    finally:
        for p in procs:
            await p.aclose()
    assert "no answer from the database" in logs, "the freeze reached a call in flight"
    await assert_exactly_once(pool, ids, batches)
    return stats


async def test_frozen_connections_are_abandoned_and_work_resumes(
    pool: AsyncConnectionPool[Any], database_url: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    await run_freeze(
        pool, database_url, proxy, tmp_path, direction="both", n=4000, call_timeout=3.0, vt=8
    )


async def test_swallowed_commit_answer_is_fenced_not_applied_twice(
    pool: AsyncConnectionPool[Any], database_url: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    stats = await run_freeze(
        pool, database_url, proxy, tmp_path, direction="to_client", n=4000, call_timeout=3.0, vt=8
    )
    # A flush committed on the server whose answer never came was retried on a fresh
    # connection, where the fence turned every one of its outcomes away.
    assert sum(s["fenced"] for s in stats) > 0, stats
    assert sum(s["flush_errors"] for s in stats) > 0, stats


async def test_sigterm_during_freeze_returns_within_stop_timeout(
    pool: AsyncConnectionPool[Any], database_url: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    n = 2000
    ids, batches = await send_workload(pool, n)
    stop_timeout = 3.0
    # The default call deadline (10 s) is longer than the stop timeout: stop must not wait on it.
    args = ["--concurrency", "32", "--vt", "5", "--stop-timeout", str(stop_timeout)]
    args += ["--handler-ms", "30"]
    procs: list[WorkerProcess] = []
    try:
        frozen_worker = await WorkerProcess.start(
            tmp_path, "frozen", proxy.dsn(database_url), *args
        )
        procs.append(frozen_worker)
        await wait_for_completed(pool, n // 10, 60.0, frozen_worker)
        proxy.freeze()
        await asyncio.sleep(0.5)  # handlers finish, their outcomes wait for a flush
        elapsed, _stats = await frozen_worker.terminate(stop_timeout + 10.0)
        # Within the stop timeout, plus the interpreter's exit.
        assert elapsed < stop_timeout + 1.5, (elapsed, frozen_worker.diagnostics())
        assert await completed(pool) < n
        # It gave up on the silent database, not waited for it.
        assert "at stop" in frozen_worker.log(), frozen_worker.diagnostics()
        # Another worker, straight to the server, gets everything left: what the stopped one
        # held is redelivered when its leases expire; nothing is applied twice.
        survivor = await WorkerProcess.start(tmp_path, "survivor", database_url, *args)
        procs.append(survivor)
        await wait_for_completed(pool, n, 60.0, survivor)
        await survivor.terminate(10.0)
    finally:
        for p in procs:
            await p.aclose()
    await assert_exactly_once(pool, ids, batches)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("RCMD_FAULTS_LONG"),
    reason="long variant (about a minute each): set RCMD_FAULTS_LONG=1 to run it",
)
@pytest.mark.parametrize("direction", ["both", "to_client"])
async def test_freeze_with_default_deadlines(
    pool: AsyncConnectionPool[Any],
    database_url: str,
    proxy: FaultProxy,
    tmp_path: Path,
    direction: str,
) -> None:
    """The issue's run with the defaults: 10 s call deadline, 30 s leases, more commands."""
    await run_freeze(
        pool, database_url, proxy, tmp_path, direction=direction, n=20000, call_timeout=10.0, vt=30
    )
