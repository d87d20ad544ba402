"""Database setup: PGMQ (extension or SQL-only install) and the numbered migrations of `sql/`."""

from __future__ import annotations

import logging
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _sql

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
        "-- commandbus schema (reliable-commands): all migrations in order.",
        "-- Requires PGMQ: CREATE EXTENSION pgmq, or PGMQ's SQL-only install.",
        "DO $$ BEGIN\n"
        "  IF to_regclass('pgmq.meta') IS NULL\n"
        "     AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq') THEN\n"
        "    CREATE EXTENSION IF NOT EXISTS pgmq;\n"
        "  END IF;\n"
        "END $$;",
    ]
    for version, name, text in _sql.migrations():
        parts.append(f"-- V{version:03d}__{name}\n{text}")
        parts.append(
            "INSERT INTO commandbus.schema_migrations (version, name) "
            f"VALUES ({version}, '{name}') ON CONFLICT (version) DO NOTHING;"
        )
    return "\n\n".join(parts) + "\n"


async def _schema_exists(conn: AsyncConnection[Any]) -> bool:
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = 'commandbus')"
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _install_pgmq(conn: AsyncConnection[Any]) -> str:
    cur = await conn.execute("SELECT to_regclass('pgmq.meta') IS NOT NULL")
    row = await cur.fetchone()
    if row and row[0]:
        return "present"
    cur = await conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'")
    if await cur.fetchone():
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        return "extension"
    from pgmq.install import get_embedded_install_sql

    await conn.execute(get_embedded_install_sql())
    return "sql"


async def _setup(conn: AsyncConnection[Any], *, skip_if_exists: bool) -> bool:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK_KEY,))
        existed = await _schema_exists(conn)
        pgmq_how = await _install_pgmq(conn)
        applied: set[int] = set()
        if existed:
            cur = await conn.execute(
                "SELECT to_regclass('commandbus.schema_migrations') IS NOT NULL"
            )
            row = await cur.fetchone()
            if row and row[0]:
                cur = await conn.execute("SELECT version FROM commandbus.schema_migrations")
                applied = {int(r[0]) for r in await cur.fetchall()}
        for version, name, text in _sql.migrations():
            if version in applied and skip_if_exists:
                continue
            logger.info("applying commandbus migration V%03d__%s", version, name)
            await conn.execute(text)
            await conn.execute(
                "INSERT INTO commandbus.schema_migrations (version, name) VALUES (%s, %s) "
                "ON CONFLICT (version) DO NOTHING",
                (version, name),
            )
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
