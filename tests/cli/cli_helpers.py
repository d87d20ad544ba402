"""Helpers of the CLI tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool

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
