"""A DSN's password never appears in an exception's text (with its causes and notes) nor in a
log line, whatever fails: an unknown host, a closed port, a missing database, a wrong password
(a role the server really checks), for every API that connects: CommandBus (the Rust engine
and psycopg), Worker (run loop and step API), setup_database, the sync API and the `rcmd` CLI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from commandbus import CommandBus, HandlerRegistry, Worker, setup_database
from commandbus.sync import SyncCommandBus

PASSWORD = "S3cr3t-pw:@/%x7f9a"  # URL-special characters: its quoted form must not leak either
FORMS = (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD))
ROLE = "rcmd_pw_role"


def _with(url: str, **parts: Any) -> str:
    """`url` with user, password, host, port or database replaced."""
    u = urlsplit(url)
    user = parts.get("user", u.username or "postgres")
    host = parts.get("host", u.hostname or "127.0.0.1")
    port = parts.get("port", u.port)
    netloc = f"{quote(user, safe='')}:{quote(PASSWORD, safe='')}@{host}"
    if port:
        netloc += f":{port}"
    path = "/" + parts["dbname"] if "dbname" in parts else u.path
    return urlunsplit(u._replace(netloc=netloc, path=path))


def _everything_said(exc: BaseException) -> str:
    """The text a user could see of an exception: str, repr, notes, causes, traceback."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(getattr(exc, "args", ()))


def _assert_clean(text: str, what: str) -> None:
    for form in FORMS:
        assert form not in text, f"the password leaked into {what}:\n{text}"


@pytest.fixture
def password_role(database_url: str) -> Iterator[str]:
    """A role whose password the server checks: a scram-sha-256 line for it, first in the
    server's pg_hba.conf (the suite's server trusts everyone else). Yields a URL as that role
    with the right password."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        hba = conn.execute("SHOW hba_file").fetchone()
        assert hba is not None
        hba_path = Path(hba[0])
        if not os.access(hba_path, os.W_OK):
            pytest.skip("needs the suite's own server (its pg_hba.conf) to check a password")
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(PASSWORD)
            )
        )
        original = hba_path.read_text()
        hba_path.write_text(
            f"host all {ROLE} all scram-sha-256\nlocal all {ROLE} scram-sha-256\n" + original
        )
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield _with(database_url, user=ROLE)
    finally:
        hba_path.write_text(original)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(f"DROP ROLE IF EXISTS {ROLE}")


def _bad_urls(database_url: str, good_role_url: str) -> dict[str, str]:
    return {
        "unknown host": _with(database_url, host="no-such-host.invalid"),
        "closed port": _with(database_url, host="127.0.0.1", port=1),
        "missing database": _with(good_role_url, dbname="no_such_db_" + uuid4().hex[:8]),
        "wrong password": _with(good_role_url).replace(
            quote(PASSWORD, safe=""), quote(PASSWORD[::-1], safe="")
        ),
    }


def _password_reaches_server(password_role: str) -> None:
    """Sanity: the right password connects and a wrong one is refused."""
    with psycopg.connect(password_role) as conn:
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(password_role.replace(quote(PASSWORD, safe=""), "wrong"))


async def _fails(what: str, fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> None:
    try:
        await asyncio.wait_for(fn(), timeout)
    except Exception as exc:  # the failure under test: its text is what is checked
        _assert_clean(_everything_said(exc), f"{what}: {type(exc).__name__}")
    else:
        raise AssertionError(f"{what} did not fail")


async def _async_apis(url: str, what: str, *, engine: bool) -> None:
    """Every async API that connects, on `url`; `engine=False` leaves out the calls that go
    through the Rust engine (a closed port costs them the engine's 30 s acquire timeout, where
    the error says only "pool timed out")."""
    pool = AsyncConnectionPool(url, min_size=0, max_size=2, open=False, timeout=0.5)
    await pool.open(wait=False)
    try:
        bus = CommandBus(pool)
        await _fails(f"{what}: CommandBus.get_command", lambda: bus.get_command("leak", uuid4()))
        await _fails(f"{what}: setup_database", lambda: setup_database(pool))
        if engine:
            await _fails(f"{what}: CommandBus.send", lambda: bus.send("leak", "T", uuid4(), {}))
            worker = Worker(pool, "leak", HandlerRegistry())
            await _fails(f"{what}: Worker.receive", lambda: worker.receive())
            await worker.close()
            # The run loop keeps retrying a database it cannot reach (logging each failure):
            # its log lines are what is checked.
            runner = Worker(pool, "leak", HandlerRegistry())
            task = asyncio.create_task(runner.run())
            await asyncio.sleep(1)
            await runner.stop(2)
            try:
                await task
            except Exception as exc:  # the run loop may end with the connection error
                _assert_clean(_everything_said(exc), f"{what}: Worker.run")
        await bus.close()
    finally:
        await pool.close()


def _sync_apis(url: str, what: str) -> None:
    pool = ConnectionPool(url, min_size=0, max_size=2, open=False, timeout=0.5)
    pool.open(wait=False)
    try:
        with SyncCommandBus(pool) as bus:
            # (its queries go through an async twin of the pool, which waits the pool's
            # 30 s for a first connection: the psycopg paths are covered by the async API)
            for name, call in (("send", lambda: bus.send("leak", "T", uuid4(), {})),):
                try:
                    call()
                except Exception as exc:
                    _assert_clean(_everything_said(exc), f"{what}: SyncCommandBus.{name}")
                else:
                    raise AssertionError(f"{what}: SyncCommandBus.{name} did not fail")
    finally:
        pool.close()


def test_no_api_shows_the_password(
    database_url: str, password_role: str, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    _password_reaches_server(password_role)
    caplog.set_level(logging.DEBUG)
    for what, url in _bad_urls(database_url, password_role).items():
        asyncio.run(_async_apis(url, what, engine=what != "closed port"))
        if what != "closed port":
            _sync_apis(url, what)
    _assert_clean("\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records), "logs")
    out, err = capfd.readouterr()
    _assert_clean(out + err, "stdout/stderr")


def test_the_cli_names_the_cause_without_the_password(
    database_url: str, password_role: str
) -> None:
    for what, url in _bad_urls(database_url, password_role).items():
        proc = subprocess.run(
            [sys.executable, "-m", "commandbus", "demo", "--dsn", url, "--commands", "10"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "RUST_LOG": "debug"},
        )  # fmt: skip
        # one line naming the cause, the DSN shown without its password, no traceback
        assert proc.returncode == 1, (what, proc.stderr)
        assert "error: cannot connect to postgresql://" in proc.stderr
        assert ":***@" in proc.stderr and "Traceback" not in proc.stderr
        _assert_clean(proc.stdout + proc.stderr, f"rcmd demo, {what}")
