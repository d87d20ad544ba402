"""Helpers of the CLI tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar
from uuid import UUID, uuid4

import psycopg
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, SendRequest

HERE = Path(__file__).resolve().parent
T = TypeVar("T")

Rcmd = Callable[..., Any]  # -> typer.testing's Result


def on_db(
    database_url: str, make: Callable[[AsyncConnectionPool[Any]], Coroutine[Any, Any, T]]
) -> T:
    """Run `make(pool)` on a pool of the test's database (the tests are sync: the CLI runs
    its own event loops)."""

    async def go() -> T:
        async with AsyncConnectionPool(database_url, min_size=1, max_size=4, open=False) as pool:
            return await make(pool)

    return asyncio.run(go())


def process_env(database_url: str) -> dict[str, str]:
    """The environment of an `rcmd` child process: this worktree's package and SQL first."""
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    paths = [str(p) for p in sys.path if p and Path(p, "commandbus").is_dir()]
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *paths, env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


Spawn = Callable[..., subprocess.Popen[str]]


class Lines:
    """The stderr (or `stream`) lines of a process, collected by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str], stream: IO[str] | None = None) -> None:
        self.lines: list[str] = []
        stream = stream or proc.stderr
        assert stream is not None
        self._thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 10.0) -> str:
        """Wait for the end of the stream (every process writing to it has exited); the text."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream is still open"
        return self.text()

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
