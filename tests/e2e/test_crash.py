"""Crash tests with real worker processes (tests/e2e/crash_worker.py), killed for real.

a. SIGKILL while handlers run: the leases expire and a second process completes everything,
   each command exactly once.
b. A handler outlives its lease: another process completes the redelivered command; the late
   outcome of the first is fenced (one COMPLETED audit row, one reply, attempts == 2).
c. Poison guard: a handler that SIGKILLs its own process, max_attempts=2: after two deaths the
   third delivery goes to the TSQ (EXHAUSTED) without running the handler.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, SendRequest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

HELPER = Path(__file__).with_name("crash_worker.py")
DOMAIN = "crash"
COMMAND_TYPE = "Crash"  # the type crash_worker.py registers
REPLY_QUEUE = "crash__replies"
# Each test stays far below this; it bounds every wait on a process or the database.
DEADLINE = 30.0


class WorkerProcess:
    """One crash_worker.py process: its stdout lines, and how to stop or kill it."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, stderr: Path) -> None:
        self.proc = proc
        self.name = name
        self.stderr = stderr
        self.lines: list[str] = []

    @classmethod
    async def start(
        cls, tmp_path: Path, name: str, dsn: str, mode: str, concurrency: int, vt: int, *extra: str
    ) -> WorkerProcess:
        stderr = tmp_path / f"{name}.stderr"
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HELPER), dsn, DOMAIN, mode, str(concurrency), str(vt), *extra,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        return cls(proc, name, stderr)

    def diagnostics(self) -> str:
        log = self.stderr.read_text(errors="replace")[-3000:] if self.stderr.exists() else ""
        return f"{self.name} (rc={self.proc.returncode}) stdout={self.lines}\nstderr:\n{log}"

    async def _readline(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            return None
        line = raw.decode().rstrip("\n")
        self.lines.append(line)
        return line

    async def expect(self, prefix: str, count: int = 1, timeout: float = DEADLINE) -> list[str]:
        """Read stdout until `count` lines starting with `prefix` came; return their rest."""
        found = [ln[len(prefix) + 1 :] for ln in self.lines if ln.startswith(prefix + " ")]
        deadline = time.monotonic() + timeout
        while len(found) < count:
            try:
                line = await self._readline(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                pytest.fail(f"timed out waiting for {count} x {prefix!r}\n{self.diagnostics()}")
            if line is None:
                pytest.fail(f"exited before {count} x {prefix!r}\n{self.diagnostics()}")
            if line.startswith(prefix + " "):
                found.append(line[len(prefix) + 1 :])
        return found

    async def wait(self, timeout: float = DEADLINE) -> int:
        """Wait for the process to exit (reading the rest of its stdout); return its code."""
        try:
            while await self._readline(timeout) is not None:
                pass
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            pytest.fail(f"did not exit in {timeout} s\n{self.diagnostics()}")

    async def kill(self) -> int:
        if self.proc.returncode is None:
            self.proc.kill()
        return await self.wait()

    async def stop(self) -> dict[str, Any]:
        """SIGTERM (graceful stop): must exit 0 and print its STATS line; return the stats."""
        self.proc.send_signal(signal.SIGTERM)
        rc = await self.wait()
        stats = [ln for ln in self.lines if ln.startswith("STATS ")]
        # A negative code after STATS: the process died of a signal (SIGABRT/SIGSEGV) while
        # the interpreter was exiting, after the worker had stopped cleanly.
        assert rc == 0, f"exit code {rc} (stopped cleanly: {bool(stats)})\n{self.diagnostics()}"
        return dict(json.loads((await self.expect("STATS"))[0]))

    async def aclose(self) -> None:
        """Kill the process if it still runs (finally blocks)."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def send(pool: AsyncConnectionPool[Any], requests: list[SendRequest]) -> list[UUID]:
    bus = CommandBus(pool)
    try:
        await bus.send_batch(requests)
    finally:
        await bus.close()
    return [r.command_id for r in requests]


def request(**kwargs: Any) -> SendRequest:
    return SendRequest(DOMAIN, COMMAND_TYPE, uuid.uuid4(), {"n": 1}, **kwargs)


async def rows(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def commands(pool: AsyncConnectionPool[Any]) -> dict[UUID, tuple[str, int, str | None]]:
    """command_id -> (status, attempts, last_error_code) of the domain."""
    found = await rows(
        pool,
        "SELECT command_id, status, attempts, last_error_code FROM commandbus.command"
        " WHERE domain = %s",
        DOMAIN,
    )
    return {r[0]: (r[1], r[2], r[3]) for r in found}


async def audit_counts(pool: AsyncConnectionPool[Any], event_type: str) -> dict[UUID, int]:
    found = await rows(
        pool,
        "SELECT command_id, count(*) FROM commandbus.audit"
        " WHERE domain = %s AND event_type = %s GROUP BY command_id",
        DOMAIN,
        event_type,
    )
    return {r[0]: r[1] for r in found}


async def queue_depth(pool: AsyncConnectionPool[Any]) -> int:
    return int((await rows(pool, f"SELECT count(*) FROM pgmq.q_{DOMAIN}__commands"))[0][0])


async def wait_until_status(
    pool: AsyncConnectionPool[Any], ids: list[UUID], status: str, *procs: WorkerProcess
) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        current = await commands(pool)
        if all(current[i][0] == status for i in ids):
            return
        if time.monotonic() > deadline:
            pending = {str(i): current[i] for i in ids if current[i][0] != status}
            details = "\n".join(p.diagnostics() for p in procs)
            pytest.fail(f"not all {status} after {DEADLINE} s: {pending}\n{details}")
        await asyncio.sleep(0.2)


async def test_sigkill_mid_flight_then_another_worker_completes_everything(
    pool: AsyncConnectionPool[Any], database_url: str, tmp_path: Path
) -> None:
    ids = await send(pool, [request() for _ in range(20)])
    procs: list[WorkerProcess] = []
    try:
        # Concurrency 8: the first worker claims 8 commands (2 s leases) and hangs in all 8.
        killed = await WorkerProcess.start(tmp_path, "killed", database_url, "hang", 8, 2)
        procs.append(killed)
        started = {UUID(s) for s in await killed.expect("STARTED", 8)}
        assert await killed.kill() == -signal.SIGKILL
        before = await commands(pool)
        assert {i for i, c in before.items() if c[0] == "IN_PROGRESS"} == started

        survivor = await WorkerProcess.start(tmp_path, "survivor", database_url, "work", 8, 30)
        procs.append(survivor)
        await wait_until_status(pool, ids, "COMPLETED", survivor)
        stats = await survivor.stop()
    finally:
        for p in procs:
            await p.aclose()

    done = [UUID(s) for s in await survivor.expect("DONE", 0)]
    assert sorted(done) == sorted(ids), "each command handled once by the survivor"
    assert stats["handled"] == 20 and stats["applied"] == 20 and stats["fenced"] == 0
    after = await commands(pool)
    assert {i: c[1] for i, c in after.items()} == {i: 2 if i in started else 1 for i in ids}
    assert await audit_counts(pool, "COMPLETED") == dict.fromkeys(ids, 1)
    assert await audit_counts(pool, "RECEIVED") == {i: 2 if i in started else 1 for i in ids}
    assert await queue_depth(pool) == 0


async def test_late_outcome_of_expired_lease_is_fenced(
    pool: AsyncConnectionPool[Any], database_url: str, tmp_path: Path
) -> None:
    [cid] = await send(pool, [request(reply_to=REPLY_QUEUE)])
    release = tmp_path / "release"
    procs: list[WorkerProcess] = []
    try:
        # A claims with a 1 s lease and keeps the handler running until `release` exists.
        a = await WorkerProcess.start(
            tmp_path, "A", database_url, "late", 1, 1, "--release", str(release)
        )
        procs.append(a)
        assert await a.expect("STARTED") == [str(cid)]
        # B claims the redelivered message once A's lease expired, and completes it.
        b = await WorkerProcess.start(tmp_path, "B", database_url, "work", 1, 30)
        procs.append(b)
        assert await b.expect("DONE") == [str(cid)]
        await wait_until_status(pool, [cid], "COMPLETED", a, b)
        assert a.proc.returncode is None, "A must still be running its handler"
        # Only now does A's handler return: its SUCCESS outcome is reported and flushed.
        release.touch()
        assert await a.expect("FINISHED") == [str(cid)]
        stats_a = await a.stop()  # the graceful stop flushes every reported outcome
        stats_b = await b.stop()
    finally:
        for p in procs:
            await p.aclose()

    assert stats_a["handled"] == 1
    assert (stats_a["applied"], stats_a["fenced"]) == (0, 1), f"A's late outcome: {stats_a}"
    assert (stats_b["applied"], stats_b["fenced"]) == (1, 0), f"B: {stats_b}"
    assert (await commands(pool))[cid] == ("COMPLETED", 2, None)
    assert await audit_counts(pool, "COMPLETED") == {cid: 1}
    result = await rows(
        pool, "SELECT result FROM commandbus.command WHERE domain = %s AND command_id = %s",
        DOMAIN, cid,
    )  # fmt: skip
    assert result[0][0]["mode"] == "work", "the stored result is B's"
    replies = [
        r[0] for r in await rows(pool, f"SELECT message FROM pgmq.read('{REPLY_QUEUE}', 30, 100)")
    ]
    assert len(replies) == 1, replies
    assert replies[0]["command_id"] == str(cid)
    assert replies[0]["outcome"] == "SUCCESS"
    assert replies[0]["result"]["mode"] == "work"
    assert await queue_depth(pool) == 0


async def test_handler_killing_its_worker_goes_to_tsq_after_max_attempts(
    pool: AsyncConnectionPool[Any], database_url: str, tmp_path: Path
) -> None:
    [cid] = await send(pool, [request(max_attempts=2)])
    marker = tmp_path / "handler-runs"
    args = ("--marker", str(marker))
    procs: list[WorkerProcess] = []
    try:
        # Runs 1 and 2: the handler SIGKILLs its own process (run 2 once run 1's lease expired).
        for run in (1, 2):
            p = await WorkerProcess.start(
                tmp_path, f"run{run}", database_url, "suicide", 1, 1, *args
            )
            procs.append(p)
            assert await p.wait() == -signal.SIGKILL, p.diagnostics()
            assert marker.read_text().split() == [str(cid)] * run
            assert (await commands(pool))[cid][:2] == ("IN_PROGRESS", run)
        # Run 3: the third delivery exceeds max_attempts: TSQ, without calling the handler.
        p = await WorkerProcess.start(tmp_path, "run3", database_url, "suicide", 1, 1, *args)
        procs.append(p)
        await wait_until_status(pool, [cid], "IN_TROUBLESHOOTING_QUEUE", *procs)
        stats = await p.stop()
    finally:
        for p in procs:
            await p.aclose()

    assert marker.read_text().split() == [str(cid)] * 2, "the handler ran exactly twice"
    assert stats["claimed"] == 0
    status, _attempts, error_code = (await commands(pool))[cid]
    assert (status, error_code) == ("IN_TROUBLESHOOTING_QUEUE", "EXHAUSTED")
    events = await rows(
        pool,
        "SELECT event_type, details_json FROM commandbus.audit"
        " WHERE domain = %s AND command_id = %s ORDER BY audit_id",
        DOMAIN, cid,
    )  # fmt: skip
    assert [e[0] for e in events] == [
        "SENT", "RECEIVED", "RECEIVED", "RETRY_EXHAUSTED", "MOVED_TO_TSQ",
    ]  # fmt: skip
    assert events[-1][1]["reason"] == "EXHAUSTED"
    assert events[-1][1]["error_code"] == "EXHAUSTED"
    assert await queue_depth(pool) == 0
    archived = await rows(
        pool, f"SELECT count(*) FROM pgmq.a_{DOMAIN}__commands WHERE message->>'command_id' = %s",
        str(cid),
    )  # fmt: skip
    assert archived[0][0] == 1
