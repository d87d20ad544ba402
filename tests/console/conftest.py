"""Fixtures and helpers of the console tests: a seeded database and a TestClient on the console
app. tests/console is a package (its __init__.py), so this module is `console.conftest` and does
not shadow tests/conftest.py, which other tests import as `conftest`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

pytest.importorskip("fastapi", reason="the console extra (fastapi) is not installed")

from fastapi.testclient import TestClient
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    SendRequest,
)
from commandbus.console import create_app
from commandbus.console.settings import ConsoleSettings
from commandbus.models import ReplyOutcome
from commandbus.process.models import ProcessAuditEntry, ProcessMetadata, ProcessStatus
from commandbus.process.repository import PostgresProcessRepository
from commandbus.testing import drain_queue

XSS = "<script>alert('x')</script>"


@dataclass
class Seeded:
    """What `seed` wrote: orders commands (some in the TSQ), a process, the XSS command."""

    completed: list[UUID] = field(default_factory=list)
    tsq: list[UUID] = field(default_factory=list)
    xss: UUID = field(default_factory=uuid4)
    process_id: UUID = field(default_factory=uuid4)


async def _seed(url: str) -> Seeded:
    seeded = Seeded()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=1, max_size=4, open=False)
    await pool.open()
    try:
        bus = CommandBus(pool)
        ids = [uuid4() for _ in range(12)]
        requests = [SendRequest("orders", "Charge", cid, {"n": i}) for i, cid in enumerate(ids)]
        requests.append(SendRequest("orders", "Charge", seeded.xss, {"n": -1, "note": XSS}))
        await bus.send_batch(requests)
        await bus.close()
        registry = HandlerRegistry()

        async def charge(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
            n = int(cmd.data["n"])
            if n < 0:
                raise PermanentCommandError("XSS", f"bad note {XSS}")
            if n % 3 == 0:
                raise PermanentCommandError("DECLINED", "card declined")
            return {"charged": n}

        registry.register("orders", "Charge", charge)
        await drain_queue(pool, "orders", registry)
        for i, cid in enumerate(ids):
            (seeded.tsq if i % 3 == 0 else seeded.completed).append(cid)
        seeded.tsq.append(seeded.xss)
        repo = PostgresProcessRepository(pool)
        await repo.save(
            ProcessMetadata(
                domain="orders",
                process_id=seeded.process_id,
                process_type="Checkout",
                state={"cart": XSS},
                status=ProcessStatus.WAITING,
                current_step="charge",
            )
        )
        await repo.log_step(
            "orders",
            seeded.process_id,
            ProcessAuditEntry(
                step_name="reserve",
                command_id=ids[1],
                command_type="Reserve",
                command_data={"sku": 1},
                sent_at=datetime.now(UTC),
                reply_outcome=ReplyOutcome.SUCCESS,
                reply_data={"ok": True},
                received_at=datetime.now(UTC),
            ),
        )
    finally:
        await pool.close()
    return seeded


@pytest.fixture
def seeded(database_url: str) -> Seeded:
    return asyncio.run(_seed(database_url))


def make_client(url: str, **settings: Any) -> TestClient:
    return TestClient(create_app(ConsoleSettings(**settings), dsn=url), base_url="http://127.0.0.1")


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    with make_client(database_url) as c:
        c.get("/")  # sets the CSRF cookie
        yield c


def csrf(client: TestClient) -> str:
    token = client.cookies.get("rcmd_csrf")
    assert token
    return str(token)


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def execute(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]
