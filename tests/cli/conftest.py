"""Fixtures of the CLI tests: `rcmd` invoked in-process (typer's CliRunner) or as a process,
against a fresh copy of the template database (real PostgreSQL, see tests/conftest.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from commandbus.cli import app

from .cli_helpers import HERE, Rcmd, process_env


@pytest.fixture
def rcmd(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Rcmd:
    """`rcmd(*args, input=None, env=None)`: the CLI in this process on the test's database."""
    monkeypatch.syspath_prepend(str(HERE))
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
        return runner.invoke(
            app, list(args), input=input, env={"DATABASE_URL": database_url, **(env or {})}
        )

    return invoke


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def spawn(database_url: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """`spawn(*args)`: `python -m commandbus *args` as a process (stderr piped, text); every
    process still running at the end of the test is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "commandbus", *args],
            cwd=HERE,
            env=process_env(database_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Ctrl-C as a terminal sends it, whatever this run inherited: a shell that starts
            # a job in the background without job control ignores SIGINT in it, and Python
            # then installs no KeyboardInterrupt handler in the child.
            preexec_fn=_default_sigint,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
