"""Bulk generation of the seed's E2E commands, worked by the probabilistic handler."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from itest_helpers import fetch, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, RetryPolicy, e2e
from commandbus.e2e import Behavior, expected_outcomes, generate
from commandbus.exceptions import ValidationError
from commandbus.ops.monitor import Monitor
from commandbus.testing import drain_queue

Pool = AsyncConnectionPool[Any]


async def test_generated_commands_end_as_the_calculator_expects(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(e2e, "GENERATION_STEP", 700)  # several steps
    behavior = Behavior(fail_permanent_pct=20, fail_transient_pct=30)
    progress: list[tuple[int, int]] = []
    bus = CommandBus(pool)
    try:
        result = await generate(
            bus, 2000, behavior, max_attempts=2, on_progress=lambda d, t: progress.append((d, t))
        )
    finally:
        await bus.close()
    assert result.count == 2000 and result.batch_id is None
    assert progress[-1] == (2000, 2000)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    await drain_queue(
        pool,
        "e2e",
        e2e.registry,
        concurrency=16,
        wait_for_retries=True,
        retry_policy=RetryPolicy(max_attempts=2, backoff_schedule=[0]),
    )
    rows = dict(
        await fetch(pool, "SELECT status, count(*) FROM commandbus.command GROUP BY status")
    )
    want = expected_outcomes(behavior, 2000, max_attempts=2)
    assert rows.get("COMPLETED", 0) + rows.get("IN_TROUBLESHOOTING_QUEUE", 0) == 2000
    sd = (want.final_tsq * (1 - want.final_tsq / 2000)) ** 0.5
    assert abs(rows["IN_TROUBLESHOOTING_QUEUE"] - want.final_tsq) < 4 * sd
    [(retried,)] = await fetch(
        pool, "SELECT count(*) FROM commandbus.audit WHERE event_type = 'RETRY_SCHEDULED'"
    )
    assert abs(retried - want.transient) < 4 * (want.transient**0.5)


async def test_generation_as_a_batch_and_its_limits(pool: Pool) -> None:
    bus = CommandBus(pool)
    try:
        result = await generate(bus, 300, Behavior(), batch_name="bulk <1>")
        assert result.batch_id is not None
        batch = await bus.get_batch("e2e", result.batch_id)
        assert batch is not None and batch.total_count == 300 and batch.name == "bulk <1>"
        with pytest.raises(ValidationError, match="count"):
            await generate(bus, 0, Behavior())
        with pytest.raises(ValidationError, match="count"):
            await generate(bus, e2e.MAX_BULK + 1, Behavior())
        with pytest.raises(ValidationError, match="count"):
            await generate(bus, e2e.MAX_BATCH + 1, Behavior(), batch_name="x")
    finally:
        await bus.close()


async def test_the_demo_worker_command_runs_several_processes(
    pool: Pool, database_url: str
) -> None:
    """`python -m commandbus.e2e --processes 2` works the generated commands; its workers are
    listed by the monitor; Ctrl-C (SIGINT to its process group) stops it."""
    bus = CommandBus(pool)
    try:
        await generate(bus, 300, Behavior(fail_permanent_pct=10))
    finally:
        await bus.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; the test then waits on the db)
        [
            sys.executable,
            "-m",
            "commandbus.e2e",
            "--dsn",
            database_url,
            "--processes",
            "2",
            "--concurrency",
            "8",
        ],
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    try:
        monitor = Monitor(pool)

        async def done() -> bool:
            [(n,)] = await fetch(
                pool,
                "SELECT count(*) FROM commandbus.command WHERE status IN"
                " ('COMPLETED', 'IN_TROUBLESHOOTING_QUEUE')",
            )
            return int(n) == 300

        await wait_until(done, timeout=60)

        async def e2e_workers() -> list[Any]:
            return [w for w in await monitor.workers() if w.domain == "e2e" and w.connected]

        async def both_seen() -> bool:
            # on a loaded machine one process may finish the 300 before the other has started
            return len(await e2e_workers()) == 2

        await wait_until(both_seen, timeout=60)
        assert len(await e2e_workers()) == 2
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
