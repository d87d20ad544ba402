"""Micro-benchmarks of the hot path, against a real PostgreSQL.

    pytest benches/ --benchmark-enable

(The project's pytest config disables benchmarks and collects only tests/; without
--benchmark-enable each benchmark below runs once, as a smoke test.)

- decode: one claimed batch of 100 native tuples into Command/HandlerContext/metadata objects
  (`Worker._received`, what the run loop does per claimed command);
- flush: 100 SUCCESS outcomes applied: through the engine (`report` x100, then wait for the
  flush barrier; the background flusher may split them into more than one transaction, see
  `extra_info["flushes"]`), and as exactly one SQL call from psycopg, `complete_commands_v1`
  (a flush of successes only) and `finish_commands_v1` (any other flush);
- send: one `CommandBus.send` on the Rust path vs the psycopg path (`conn=`, inside a
  transaction the caller opens on a pool connection).

The module starts its own `EmbeddedServer` (or uses DATABASE_URL: a role that may CREATE
DATABASE) and works in a private database, on one event loop driven with
`run_until_complete` (pytest-benchmark times synchronous callables).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest
from psycopg import AsyncRawCursor
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, SendRequest, _native, _sql, setup_database
from commandbus._bridge import call
from commandbus.embedded import EmbeddedServer, create_database, drop_database
from commandbus.handler import HandlerRegistry
from commandbus.worker import Worker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _client import COMMAND_TYPE, make_data

DOMAIN = "micro"
PAYLOAD_BYTES = 128
BATCH = 100
DB_NAME = f"rcmd_micro_{os.getpid()}"

T = TypeVar("T")


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    dsn: str
    pool: AsyncConnectionPool[Any]
    bus: CommandBus
    native: _native.NativeWorker
    worker: Worker

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(aw)

    async def send_many(self, n: int) -> list[UUID]:
        ids = [uuid4() for _ in range(n)]
        await self.bus.send_batch(
            [SendRequest(DOMAIN, COMMAND_TYPE, cid, make_data(i, PAYLOAD_BYTES)) for i, cid in
             enumerate(ids)]
        )  # fmt: skip
        return ids

    async def claim(self, n: int) -> list[Any]:
        native = self.native
        items: list[Any] = await call(lambda c: native.receive(c, n, 300))
        return items


async def _wrap(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    server: EmbeddedServer | None = None
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        server = EmbeddedServer().start()
        admin = server.dsn
    dsn = create_database(admin, DB_NAME)
    loop = asyncio.new_event_loop()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=2, max_size=4, open=False)
    try:
        loop.run_until_complete(pool.open(wait=True))
        loop.run_until_complete(setup_database(pool))
        bus = CommandBus(pool)
        worker = Worker(pool, DOMAIN, HandlerRegistry())
        native = _native.NativeWorker(worker._dsn, DOMAIN, use_notify=False)
        loop.run_until_complete(_wrap(lambda: call(native.start)))
        e = Env(loop, dsn, pool, bus, native, worker)
        e.run(e.send_many(10))  # the queue exists, connections are warm
        yield e
        loop.run_until_complete(_wrap(lambda: call(native.shutdown)))
        loop.run_until_complete(bus.close())
    finally:
        loop.run_until_complete(pool.close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        drop_database(admin, DB_NAME)
        if server is not None:
            server.stop()


# -- decode --------------------------------------------------------------------------------


@pytest.mark.benchmark(group="decode")
def test_decode_claimed_batch_of_100(benchmark: Any, env: Env) -> None:
    env.run(env.send_many(BATCH))
    items = env.run(env.claim(BATCH))
    assert len(items) == BATCH
    worker, native = env.worker, env.native

    def decode() -> list[Any]:
        return [worker._received(native, item) for item in items]

    received = benchmark(decode)
    assert received[0].command.data["pad"].startswith("x")
    for item in items:  # give the leases back through the normal path
        native.report(item[0], item[1], _native.Outcome.success(None))
    env.run(_wrap(lambda: call(native.flush)))


# -- flush ---------------------------------------------------------------------------------


@pytest.mark.benchmark(group="flush-100")
def test_flush_100_outcomes_engine(benchmark: Any, env: Env) -> None:
    native = env.native
    state: dict[str, Any] = {}

    def setup() -> None:
        env.run(env.send_many(BATCH))
        state["items"] = env.run(env.claim(BATCH))
        assert len(state["items"]) == BATCH

    async def report_and_flush() -> None:
        for item in state["items"]:
            native.report(item[0], item[1], _native.Outcome.success(None))
        await call(native.flush)

    before = native.stats()
    benchmark.pedantic(lambda: env.run(report_and_flush()), setup=setup, rounds=30)
    after = native.stats()
    applied = int(after["applied"] or 0) - int(before["applied"] or 0)
    flushes = int(after["flushes"] or 0) - int(before["flushes"] or 0)
    assert applied % BATCH == 0 and applied > 0
    benchmark.extra_info["flushes_per_round"] = round(flushes / (applied // BATCH), 2)


@pytest.mark.benchmark(group="flush-100")
@pytest.mark.parametrize("statement", ["complete_commands", "finish_commands"])
def test_flush_100_outcomes_one_sql_call(benchmark: Any, env: Env, statement: str) -> None:
    """The flush statement alone, one call with 100 SUCCESS outcomes (psycopg):
    `complete_commands_v1`, what the engine runs for a flush of successes only, and
    `finish_commands_v1`, what it runs when any outcome is another kind."""
    state: dict[str, Any] = {}

    async def claim_sql() -> list[tuple[Any, ...]]:
        async with (
            env.pool.connection() as conn,
            AsyncRawCursor(conn, row_factory=tuple_row) as cur,
        ):
            await cur.execute(_sql.statement("lease_messages"), [DOMAIN, 300, BATCH])
            [(leased,)] = await cur.fetchall()
            await cur.execute(_sql.statement("claim_leased"), [DOMAIN, leased, 3])
            return await cur.fetchall()

    def setup() -> None:
        env.run(env.send_many(BATCH))
        state["rows"] = env.run(claim_sql())
        assert len(state["rows"]) == BATCH

    async def finish() -> int:
        rows = state["rows"]
        n = len(rows)
        params: list[Any] = [
            DOMAIN,
            [r[3] for r in rows],  # command_id
            [r[0] for r in rows],  # msg_id
            [r[1] for r in rows],  # attempt
        ]
        if statement == "finish_commands":
            params += [["SUCCESS"] * n, [None] * n, [None] * n, [None] * n, [None] * n,
                       [None] * n, [0] * n, 3]  # fmt: skip
        else:
            params += [[None] * n]
        params.append([r[9] for r in rows])  # created_at_us: each row's partition (V006)
        async with (
            env.pool.connection() as conn,
            AsyncRawCursor(conn, row_factory=tuple_row) as cur,
        ):
            await cur.execute(_sql.statement(statement), params)
            return len(await cur.fetchall())

    results: list[int] = []
    benchmark.pedantic(lambda: results.append(env.run(finish())), setup=setup, rounds=30)
    assert results and all(n == BATCH for n in results)


# -- send ----------------------------------------------------------------------------------


@pytest.mark.benchmark(group="send-one")
def test_send_rust_path(benchmark: Any, env: Env) -> None:
    bus, data = env.bus, make_data(0, PAYLOAD_BYTES)

    async def send() -> None:
        await bus.send(DOMAIN, COMMAND_TYPE, uuid4(), data)

    benchmark(lambda: env.run(send()))


@pytest.mark.benchmark(group="send-one")
def test_send_psycopg_path_conn(benchmark: Any, env: Env) -> None:
    bus, pool, data = env.bus, env.pool, make_data(0, PAYLOAD_BYTES)

    async def send() -> None:
        async with pool.connection() as conn, conn.transaction():
            await bus.send(DOMAIN, COMMAND_TYPE, uuid4(), data, conn=conn)

    benchmark(lambda: env.run(send()))
