"""Prometheus metrics: counters checked against the database after real worker runs, the
HTTP endpoint with the queue gauges, the sync worker, and two worker processes aggregated."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Awaitable
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from itest_helpers import fetch, wait_until
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from commandbus import (
    BusinessRuleException,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    RetryPolicy,
    SendRequest,
    TransientCommandError,
    Worker,
)
from commandbus.metrics import WorkerMetrics, instrument, mark_process_dead, start_metrics_server
from commandbus.sync import SyncWorker

HERE = Path(__file__).resolve().parent
DOMAIN = "metered"
FAST = RetryPolicy(max_attempts=2, backoff_schedule=[0])


def _registry(domain: str = DOMAIN) -> HandlerRegistry:
    registry = HandlerRegistry()

    @registry.handler(domain, "Ok")
    async def ok(cmd: Command, ctx: HandlerContext) -> None:
        await asyncio.sleep(0.002)

    @registry.handler(domain, "Rule")
    async def rule(cmd: Command, ctx: HandlerContext) -> None:
        raise BusinessRuleException("RULE", "not allowed")

    @registry.handler(domain, "Perm")
    def perm(cmd: Command, ctx: HandlerContext) -> None:
        raise PermanentCommandError("PERM", "broken")

    @registry.handler(domain, "Flaky")
    async def flaky(cmd: Command, ctx: HandlerContext) -> None:
        raise TransientCommandError("FLAKY", "try again")

    return registry


COUNTS = {"Ok": 30, "Rule": 4, "Perm": 3, "Flaky": 5}


async def _send_all(pool: AsyncConnectionPool[Any], domain: str = DOMAIN) -> None:
    bus = CommandBus(pool)
    await bus.send_batch(
        [
            SendRequest(domain=domain, command_type=t, command_id=uuid4(), data={"i": i})
            for t, n in COUNTS.items()
            for i in range(n)
        ]
    )


async def _terminal(pool: AsyncConnectionPool[Any], domain: str = DOMAIN) -> bool:
    rows = await fetch(
        pool,
        "SELECT count(*) FROM commandbus.command WHERE domain = %s"
        " AND status IN ('COMPLETED', 'FAILED', 'IN_TROUBLESHOOTING_QUEUE')",
        domain,
    )
    return int(rows[0][0]) == sum(COUNTS.values())


async def _by_status(pool: AsyncConnectionPool[Any], domain: str = DOMAIN) -> dict[str, int]:
    rows = await fetch(
        pool,
        "SELECT status, count(*) FROM commandbus.command WHERE domain = %s GROUP BY status",
        domain,
    )
    return {status: int(n) for status, n in rows}


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _check_against_db(get: Any, status: dict[str, int], domain: str = DOMAIN) -> None:
    """The outcome counters and the engine's counters agree with the database."""

    def by_type(name: str, command_type: str) -> float:
        return float(get(name, domain=domain, command_type=command_type))

    completed = sum(by_type("rcmd_commands_completed_total", t) for t in COUNTS)
    failed = sum(by_type("rcmd_commands_failed_total", t) for t in COUNTS)
    tsq = sum(by_type("rcmd_commands_tsq_total", t) for t in COUNTS)
    assert completed == status.get("COMPLETED", 0) == COUNTS["Ok"]
    assert failed == status.get("FAILED", 0) == COUNTS["Rule"]
    assert tsq == status.get("IN_TROUBLESHOOTING_QUEUE", 0) == COUNTS["Perm"] + COUNTS["Flaky"]
    assert by_type("rcmd_commands_tsq_total", "Perm") == COUNTS["Perm"]
    # FAST allows 2 attempts: each Flaky command is retried once, then exhausted
    assert by_type("rcmd_commands_retried_total", "Flaky") == COUNTS["Flaky"]
    runs = sum(COUNTS.values()) + COUNTS["Flaky"]
    durations = sum(by_type("rcmd_handler_duration_seconds_count", t) for t in COUNTS)
    assert durations == runs
    assert by_type("rcmd_handler_duration_seconds_sum", "Ok") >= 0.002 * COUNTS["Ok"]
    waits = sum(by_type("rcmd_command_queue_wait_seconds_count", t) for t in COUNTS)
    assert waits == sum(COUNTS.values())  # first attempts only
    assert get("rcmd_claimed_commands_total", domain=domain) == runs
    assert get("rcmd_flushed_outcomes_total", domain=domain) == runs
    assert get("rcmd_claims_total", domain=domain) >= 1
    assert get("rcmd_claim_seconds_total", domain=domain) > 0
    assert get("rcmd_flushes_total", domain=domain) >= 1
    assert get("rcmd_flush_seconds_total", domain=domain) > 0
    assert get("rcmd_flush_errors_total", domain=domain) == 0
    assert get("rcmd_handlers_in_flight", domain=domain) == 0


async def test_counters_match_the_database_and_the_endpoint_serves_queue_state(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    registry = CollectorRegistry()
    worker = Worker(pool, DOMAIN, _registry(), retry_policy=FAST)
    metrics = instrument(worker, WorkerMetrics(registry))
    assert metrics.completed._name == "rcmd_commands_completed"
    await _send_all(pool)
    server = start_metrics_server(0, dsn=database_url, domains=[DOMAIN], registry=registry)
    try:
        # before the run: the backlog, read from the database at scrape time
        status, text = await asyncio.to_thread(_scrape, server.port)
        assert status == 200
        before = _samples(text)
        assert _value(before, "rcmd_queue_scrape_ok") == 1
        assert _value(before, "rcmd_queue_messages", domain=DOMAIN) == sum(COUNTS.values())
        assert _value(before, "rcmd_queue_oldest_message_age_seconds", domain=DOMAIN) >= 0
        assert _value(before, "rcmd_tsq_commands", domain=DOMAIN) == 0

        task = asyncio.create_task(worker.run(concurrency=8, poll_interval=0.05))
        await wait_until(lambda: _terminal(pool))
        await worker.stop(timeout=5)
        await task

        _check_against_db(lambda n, **kw: registry.get_sample_value(n, kw), await _by_status(pool))
        status, text = await asyncio.to_thread(_scrape, server.port)
        after = _samples(text)
        _check_against_db(lambda n, **kw: _value(after, n, **kw), await _by_status(pool))
        assert _value(after, "rcmd_queue_messages", domain=DOMAIN) == 0
        tsq = COUNTS["Perm"] + COUNTS["Flaky"]
        assert _value(after, "rcmd_tsq_commands", domain=DOMAIN) == tsq

        # The queue table's dead rows (every message leased, then deleted or archived) once
        # the backends have reported them, and after a VACUUM, fewer and a vacuum age.
        async def dead_rows() -> float:
            _, text = await asyncio.to_thread(_scrape, server.port)
            return _value(_samples(text), "rcmd_queue_dead_rows", domain=DOMAIN)

        await wait_until(lambda: _positive(dead_rows()), timeout=10)
        dead = await dead_rows()
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(f"VACUUM pgmq.q_{DOMAIN}__commands".encode())
        _, text = await asyncio.to_thread(_scrape, server.port)
        vacuumed = _samples(text)
        assert _value(vacuumed, "rcmd_queue_dead_rows", domain=DOMAIN) < dead
        age_key = ("rcmd_queue_vacuum_age_seconds", (("domain", DOMAIN),))
        assert age_key in vacuumed  # absent until the table's first vacuum
        assert 0 <= vacuumed[age_key] < 60
    finally:
        server.close()


async def _positive(value: Awaitable[float]) -> bool:
    return await value > 0


async def test_an_unreachable_database_reads_as_scrape_not_ok() -> None:
    registry = CollectorRegistry()
    dead = "postgresql://postgres@127.0.0.1:9/none?connect_timeout=1"
    with start_metrics_server(0, dsn=dead, domains=["x"], registry=registry) as server:
        status, text = await asyncio.to_thread(_scrape, server.port)
    assert status == 200
    samples = _samples(text)
    assert _value(samples, "rcmd_queue_scrape_ok") == 0
    assert not [k for k in samples if k[0] == "rcmd_queue_messages"]


def test_sync_worker_counts_its_outcomes(database_url: str) -> None:
    registry = CollectorRegistry()
    domain = "metered_sync"
    with ConnectionPool(database_url, min_size=1, max_size=2, open=True) as spool:
        worker = SyncWorker(spool, domain, _registry(domain), retry_policy=FAST)
        instrument(worker, WorkerMetrics(registry))

        async def prepare() -> None:
            async with AsyncConnectionPool(database_url, min_size=1, open=False) as apool:
                await _send_all(apool, domain)

        asyncio.run(prepare())
        thread = threading.Thread(target=worker.run, kwargs={"concurrency": 4})
        thread.start()

        async def wait_and_count() -> dict[str, int]:
            async with AsyncConnectionPool(database_url, min_size=1, open=False) as apool:
                await wait_until(lambda: _terminal(apool, domain))
                return await _by_status(apool, domain)

        status = asyncio.run(wait_and_count())
        worker.stop(timeout=5)
        thread.join(10)
    _check_against_db(lambda n, **kw: registry.get_sample_value(n, kw), status, domain)


@pytest.mark.timeout(90)
async def test_two_worker_processes_aggregate(
    pool: AsyncConnectionPool[Any], database_url: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """Two processes in prometheus_client's multiprocess mode; the served aggregate matches
    the database; a process marked dead drops out of the live gauge."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    script = HERE / "metrics_worker_proc.py"
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited on
            [sys.executable, str(script), database_url, DOMAIN],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mp_dir))
    server = start_metrics_server(0, dsn=database_url, domains=[DOMAIN])
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "READY"
        await _send_all(pool)
        await wait_until(lambda: _terminal(pool), timeout=40)
        # the counts reach the files within a second (PUBLISH_INTERVAL)
        status = await _by_status(pool)
        runs = sum(COUNTS.values()) + COUNTS["Flaky"]

        async def flushed_all() -> bool:
            _, text = await asyncio.to_thread(_scrape, server.port)
            got = _value(_samples(text), "rcmd_flushed_outcomes_total", domain=DOMAIN)
            return got == runs

        await wait_until(flushed_all, timeout=10)
        _, text = await asyncio.to_thread(_scrape, server.port)
        samples = _samples(text)
        _check_against_db(lambda n, **kw: _value(samples, n, **kw), status)
        assert _value(samples, "rcmd_queue_messages", domain=DOMAIN) == 0
        # both processes wrote their own values
        assert len(list(mp_dir.glob("counter_*.db"))) == 2
        assert len(list(mp_dir.glob("gauge_livesum_*.db"))) == 2
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        errors = []
        for p in procs:
            try:
                _, err = await asyncio.to_thread(p.communicate, timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            errors.append(err)
            mark_process_dead(p.pid)
        _, text = await asyncio.to_thread(_scrape, server.port)
        server.close()
    assert all(p.returncode == 0 for p in procs), errors
    assert not list(mp_dir.glob("gauge_livesum_*.db"))
    # counters survive their processes
    done = _value(_samples(text), "rcmd_commands_completed_total", domain=DOMAIN, command_type="Ok")
    assert done == COUNTS["Ok"]
