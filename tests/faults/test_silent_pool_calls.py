"""The psycopg paths the library runs itself on a pool have a deadline (issue 15): a call on a
connection that went silent (a proxy that stops forwarding without closing it) raises
`DatabaseError` within the pool's deadline plus psycopg's cancellation, its connection never
goes back to the pool, and the next call works on a fresh connection. The step API's
`Worker.close()` keeps to its budget the same way."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
from proxy import FaultProxy
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, DatabaseError, TroubleshootingQueue, Worker

pytestmark = [pytest.mark.timeout(90)]

CALL_TIMEOUT = 1.0  # the pool's deadline: 3 s
# Deadline, then psycopg's cancel request and its 5 s wait for the answer, with room for a
# loaded machine.
GIVE_UP_WITHIN = 3 * CALL_TIMEOUT + 5 + 4


async def test_a_call_on_a_silent_connection_is_abandoned_and_the_next_one_works(
    proxied: tuple[FaultProxy, str], pool: AsyncConnectionPool[Any]
) -> None:
    proxy, dsn = proxied
    behind: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        dsn, min_size=1, max_size=1, open=False
    )
    await behind.open(wait=True)
    try:
        bus = CommandBus(behind, call_timeout=CALL_TIMEOUT)
        command_id = uuid.uuid4()
        await bus.send("silent", "Ok", command_id, {"n": 1})
        assert (await bus.get_command("silent", command_id)) is not None
        assert proxy.freeze() == 1 + 1  # the pool's connection, and the engine's send one
        t0 = time.monotonic()
        with pytest.raises(DatabaseError, match="no answer from the database") as err:
            await bus.get_command("silent", command_id)
        took = time.monotonic() - t0
        assert 3 * CALL_TIMEOUT - 0.5 <= took < GIVE_UP_WITHIN, took
        assert isinstance(err.value.__cause__, TimeoutError)
        # The silent connection left the pool (one slot only): the next call, still frozen
        # for the old connections, opens a fresh one and answers.
        got = await bus.get_command("silent", command_id)
        assert got is not None and got.command_id == command_id
        # Other library objects on the pool have the deadline too (the TSQ, say).
        tsq = TroubleshootingQueue(behind)
        assert await tsq.list_troubleshooting("silent") == []
        # The bus's engine connection is frozen too: closing the bus keeps to the call timeout.
        t0 = time.monotonic()
        await bus.close()
        assert time.monotonic() - t0 < CALL_TIMEOUT + 2
    finally:
        await behind.close()


async def test_a_call_waiting_on_a_lock_gives_up_and_the_connection_is_reused(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    """Not a network fault: a statement that runs too long is cancelled in the server (psycopg
    sends the cancel request); the connection answers, so the pool keeps it."""
    from commandbus import _db

    small: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, min_size=1, max_size=1, open=False
    )
    await small.open(wait=True)
    try:
        _db.set_pool_deadline(small, 0.5)
        t0 = time.monotonic()
        with pytest.raises(DatabaseError, match=r"within 0\.5 s"):
            await _db.fetch_all_text(small, "SELECT pg_sleep(20)")
        assert time.monotonic() - t0 < 5
        assert await _db.fetch_all_text(small, "SELECT 1") == [(1,)]
        assert small.get_stats().get("connections_lost", 0) == 0
    finally:
        await small.close()


async def test_step_api_close_keeps_to_its_budget_on_a_silent_connection(
    proxied: tuple[FaultProxy, str], pool: AsyncConnectionPool[Any]
) -> None:
    proxy, dsn = proxied
    bus = CommandBus(pool)
    await bus.send("silentstep", "Ok", uuid.uuid4(), {})
    behind: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        dsn, min_size=1, max_size=2, open=False
    )
    await behind.open(wait=True)
    try:
        worker = Worker(behind, "silentstep", call_timeout=CALL_TIMEOUT)
        (received,) = await worker.receive()
        # The engine's connections go silent with the lease held, and new ones get nowhere
        # in time (a minute per packet): nothing can be released.
        proxy.freeze()
        proxy.add_latency(60_000)
        t0 = time.monotonic()
        await worker.close(timeout=2.0)
        assert time.monotonic() - t0 < 2.0 + 1.5
    finally:
        await behind.close()
    # The lease was not released: the command comes back when it expires (never lost).
    metadata = await bus.get_command("silentstep", received.command.command_id)
    assert metadata is not None and metadata.status.value == "IN_PROGRESS"
    await bus.close()


def test_a_scrape_of_the_queue_metrics_keeps_to_its_timeout(
    proxied: tuple[FaultProxy, str],
) -> None:
    """The metrics endpoint's queue gauges, read at scrape time, behind a proxy whose every
    packet now waits a minute: the scrape reports `rcmd_queue_scrape_ok 0` within its timeout
    (before, a connection gone silent hung that scrape and every later one), and the next
    scrape after the fault reads the database again."""
    from commandbus.metrics import QueueCollector

    proxy, dsn = proxied

    def scrape_ok(collector: QueueCollector) -> float:
        (ok, *_rest) = list(collector.collect())
        return float(ok.samples[0].value)

    collector = QueueCollector(dsn, ["silentscrape"], timeout=1.0)
    assert scrape_ok(collector) == 1
    proxy.add_latency(60_000)
    t0 = time.monotonic()
    assert scrape_ok(collector) == 0
    assert time.monotonic() - t0 < 1.0 + 5 + 2  # timeout, psycopg's cancel wait at most
    proxy.add_latency(0)
    assert scrape_ok(collector) == 1
