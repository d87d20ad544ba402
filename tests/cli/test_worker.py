"""`rcmd worker` and `rcmd dev` as real processes: a worker works commands and stops on SIGTERM;
the supervisor of `--processes 2` restarts a child killed with SIGKILL and, on SIGTERM, stops
every child gracefully with no command lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from cli_handlers import registry
from cli_helpers import on_db
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, SendRequest
from commandbus.testing import drain_queue

Spawn = Callable[..., subprocess.Popen[str]]


class Lines:
    """The stderr lines of a process, collected by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        stream = proc.stderr
        self._thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._thread.start()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[re.Match[str]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for line in list(self.lines) if (m := re.search(pattern, line))]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {pattern!r} in:\n{self.text()}")
            time.sleep(0.05)


def send(database_url: str, count: int, data: dict[str, Any]) -> list[UUID]:
    ids = [uuid4() for _ in range(count)]

    async def go(pool: AsyncConnectionPool[Any]) -> None:
        bus = CommandBus(pool)
        await bus.send_batch([SendRequest("clitest", "Work", i, data) for i in ids])
        await bus.close()

    on_db(database_url, go)
    return ids


def statuses(database_url: str, ids: list[UUID]) -> dict[UUID, str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT command_id, status FROM commandbus.command WHERE command_id = ANY(%s)", (ids,)
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def completed_events(database_url: str, ids: list[UUID]) -> dict[UUID, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT command_id, count(*) FROM commandbus.audit"
            " WHERE event_type = 'COMPLETED' AND command_id = ANY(%s) GROUP BY 1",
            (ids,),
        ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def wait_all(database_url: str, ids: list[UUID], status: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := statuses(database_url, ids)) and set(now.values()) != {status}:
        assert time.monotonic() < deadline, sorted(set(now.values()))
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_worker_works_and_stops_on_sigterm(database_url: str, spawn: Spawn, sync: bool) -> None:
    ids = send(database_url, 30, {})
    proc = spawn("worker", "cli_handlers:registry", "-c", "8", *(["--sync"] if sync else []))
    log = Lines(proc)
    wait_all(database_url, ids, "COMPLETED")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, log.text()
    log.wait_for(r"worker for clitest stopped")
    assert "Traceback" not in log.text()


def test_worker_bad_input_as_a_process(spawn: Spawn) -> None:
    proc = spawn("worker", "no_such_handlers_module:registry")
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.strip() == "error: cannot import 'no_such_handlers_module': no module named " \
        "'no_such_handlers_module'"  # fmt: skip
    proc = spawn("worker", "cli_handlers:registry", "--processes", "2", "--dsn",
                 "postgresql://nobody@127.0.0.1:1/none")  # fmt: skip
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "started" not in err  # no child was started
    assert err.strip().startswith("error: cannot connect to") and len(err.strip().splitlines()) == 1


def test_supervisor_restarts_a_killed_child_and_stops_all_gracefully(
    database_url: str, spawn: Spawn
) -> None:
    sup = spawn(
        "worker", "cli_handlers:registry", "--processes", "2", "--concurrency", "4",
        "--visibility-timeout", "2", "--stop-timeout", "20", "--poll-interval", "0.2",
    )  # fmt: skip
    log = Lines(sup)
    started = log.wait_for(r"started: pid (\d+)", count=2)
    pids = [int(m.group(1)) for m in started]
    first = send(database_url, 24, {"sleep": 0.3})
    log.wait_for(r"clitest starting", count=2)
    time.sleep(0.5)  # both children busy

    os.kill(pids[0], signal.SIGKILL)
    log.wait_for(rf"pid {pids[0]}\) exited with -9")
    restarted = log.wait_for(r"started: pid (\d+)", count=3)
    new_pid = int(restarted[2].group(1))
    assert new_pid not in pids and alive(new_pid) and alive(pids[1])
    # the killed child's leases run out (2 s) and its commands are worked again
    wait_all(database_url, first, "COMPLETED")

    second = send(database_url, 16, {"sleep": 1.0})
    deadline = time.monotonic() + 10
    while "IN_PROGRESS" not in statuses(database_url, second).values():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0, log.text()
    assert not alive(new_pid) and not alive(pids[1])
    log.wait_for(r"all worker processes stopped")
    text = log.text()
    assert text.count("signal received, stopping") == 2  # one SIGTERM per child, no second one
    assert "handlers cancelled" not in text and "Traceback" not in text

    # graceful: what was running finished, what was claimed but not started went back
    after = statuses(database_url, second)
    assert set(after.values()) <= {"COMPLETED", "PENDING"}, after
    assert "COMPLETED" in after.values()

    async def finish(pool: AsyncConnectionPool[Any]) -> None:
        await drain_queue(pool, "clitest", registry, concurrency=16)

    on_db(database_url, finish)
    everything = first + second
    wait_all(database_url, everything, "COMPLETED", timeout=5)
    assert completed_events(database_url, everything) == dict.fromkeys(everything, 1)


def test_dev_starts_a_server_and_stops_on_ctrl_c(spawn: Spawn) -> None:
    proc = spawn("dev", "--in-memory")
    assert proc.stdout is not None
    dsn = proc.stdout.readline().strip()
    assert dsn.startswith("postgresql://"), dsn
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT to_regnamespace('commandbus') IS NOT NULL").fetchone()
    assert row == (True,)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
