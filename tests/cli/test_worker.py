"""`rcmd worker` and `rcmd dev` as real processes: a worker works commands and stops on SIGTERM;
the supervisor of `--processes 2` restarts a child killed with SIGKILL and, on SIGTERM, stops
every child gracefully with no command lost."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from commandbus.testing import drain_queue

from .cli_handlers import registry
from .cli_helpers import (
    Lines,
    Spawn,
    alive,
    completed_events,
    on_db,
    send,
    statuses,
    wait_all,
)


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
    """A supervisor whose database does not answer says so in one line and starts no child
    (the other bad inputs of `rcmd worker` are tested in-process: tests/unit/test_cli.py)."""
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
    log.wait_for(r"clitest starting", count=3)  # the new child runs its worker
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
    text = log.finish()
    assert "all worker processes stopped" in text
    assert text.count("signal received, stopping") == 2, text  # one SIGTERM per child, no second
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


def test_stats_watch_refreshes_until_ctrl_c(database_url: str, spawn: Spawn) -> None:
    send(database_url, 3, {})
    proc = spawn("stats", "--watch", "--interval", "0.2")
    assert proc.stdout is not None
    out = Lines(proc, proc.stdout)
    out.wait_for(r"^rcmd stats", count=3)  # into a pipe, each refresh prints a table
    [row, *_] = out.wait_for(r"^clitest\s")
    assert row.string.split("│")[1].strip() == "3"  # pending
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
