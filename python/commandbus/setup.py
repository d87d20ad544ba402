"""Database setup: PGMQ (extension or SQL-only install) and the numbered migrations of `sql/`."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _db, _sql
from commandbus.exceptions import DatabaseError

logger = logging.getLogger(__name__)

# Serialises concurrent setup_database() calls (two services starting at once).
_SETUP_LOCK_KEY = 0x72636D64  # "rcmd"

PoolOrConn = AsyncConnectionPool[Any] | AsyncConnection[Any]


def get_schema_sql() -> str:
    """Return the full SQL of the commandbus schema, for a migration tool (Flyway, Alembic...).

    It installs nothing of PGMQ by itself when the server lacks the extension: run
    `setup_database()` once, or PGMQ's own SQL install, before it.
    """
    parts = [
        "-- commandbus schema (reliable-commands): every migration in order.",
        _sql.statement("schema_prelude").rstrip() + ";",
    ]
    parts += [f"-- V{version:03d}__{name}\n{text}" for version, name, text in _sql.migrations()]
    return "\n\n".join(parts) + "\n"


async def _schema_exists(conn: AsyncConnection[Any]) -> bool:
    return bool(await _db.fetch_value(conn, "schema_exists"))


async def _install_pgmq(conn: AsyncConnection[Any]) -> str:
    if await _db.fetch_value(conn, "setup_pgmq_installed"):
        return "present"
    if await _db.fetch_value(conn, "setup_pgmq_available"):
        await _db.execute(conn, "setup_pgmq_extension")
        return "extension"
    from pgmq.install import get_embedded_install_sql

    await conn.execute(get_embedded_install_sql())
    return "sql"


async def _applied(conn: AsyncConnection[Any]) -> set[int]:
    """Versions recorded in commandbus.schema_migrations (empty before V001 ran)."""
    try:
        async with conn.transaction():
            rows = await _db.fetch_all(conn, "setup_migrations_applied")
    except DatabaseError as err:
        if isinstance(err.__cause__, psycopg.errors.UndefinedTable):
            return set()
        raise
    return {int(r[0]) for r in rows}


async def _setup(conn: AsyncConnection[Any], *, skip_if_exists: bool) -> bool:
    async with conn.transaction():
        await _db.execute(conn, "setup_lock", _SETUP_LOCK_KEY)
        existed = await _schema_exists(conn)
        pgmq_how = await _install_pgmq(conn)
        applied = await _applied(conn) if existed else set()
        for version, name, text in _sql.migrations():
            if version in applied and skip_if_exists:
                continue
            logger.info("applying commandbus migration V%03d__%s", version, name)
            await conn.execute(text)
            await _db.execute(conn, "setup_migration_record", version, name)
        # The audit trail's day partitions, a week ahead (workers keep extending them).
        await _db.fetch_value(conn, "partitions_ensure", 7)
        logger.info("commandbus schema ready (PGMQ: %s, created: %s)", pgmq_how, not existed)
    return not existed


async def setup_database(pool_or_conn: PoolOrConn, *, skip_if_exists: bool = True) -> bool:
    """Install PGMQ if needed and bring the commandbus schema up to date.

    Idempotent and safe to call from several processes at once. Returns True when it created
    the schema, False when the schema was already there (pending migrations are still applied,
    so a database of `reliable-cmd` 0.2.2 is upgraded in place). With `skip_if_exists=False`
    every migration is re-run (they are all idempotent).
    """
    if isinstance(pool_or_conn, AsyncConnectionPool):
        async with pool_or_conn.connection() as conn:
            return await _setup(conn, skip_if_exists=skip_if_exists)
    return await _setup(pool_or_conn, skip_if_exists=skip_if_exists)


async def check_schema_exists(pool_or_conn: PoolOrConn) -> bool:
    """Return True when the `commandbus` schema exists."""
    if isinstance(pool_or_conn, AsyncConnectionPool):
        async with pool_or_conn.connection() as conn:
            return await _schema_exists(conn)
    return await _schema_exists(pool_or_conn)
