"""Fixtures of the integration tests beyond the shared ones (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import pytest_asyncio

from commandbus.embedded import create_database, drop_database


@pytest_asyncio.fixture
async def empty_db(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A database of its own with nothing in it (no PGMQ, no schema), dropped afterwards: for
    the tests of setup and upgrades."""
    name = f"rcmd_empty_{uuid4().hex[:8]}"
    dsn = create_database(pg_admin_dsn, name)
    try:
        yield dsn
    finally:
        drop_database(pg_admin_dsn, name)
