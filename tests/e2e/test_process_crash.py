"""Crash test of a process manager: the reply router process (tests/e2e/process_router.py) is
SIGKILLed between a step's reply and the next step (it read the first step's reply, recorded it
and hangs while building the second step's command, uncommitted). A second router process,
once the reply's visibility timeout ran out, handles it again: the process completes, with one
reply recorded per step, one second-step command sent and handled, and no reply left over."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from process_router import DOMAIN, REPLY_QUEUE, TwoSteps
from psycopg_pool import AsyncConnectionPool
from test_crash import WorkerProcess, rows

from commandbus import Command, CommandBus, HandlerContext, HandlerRegistry, Worker
from commandbus.process import PostgresProcessRepository, ProcessStatus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ROUTER = Path(__file__).with_name("process_router.py")


async def start_router(tmp_path: Path, name: str, dsn: str, mode: str, vt: int) -> WorkerProcess:
    stderr = tmp_path / f"{name}.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROUTER), dsn, mode, str(vt),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
        )  # fmt: skip
    return WorkerProcess(proc, name, stderr)


async def test_router_killed_between_a_reply_and_the_next_step(
    pool: AsyncConnectionPool[Any], database_url: str, tmp_path: Path
) -> None:
    handled: list[tuple[str, int]] = []
    registry = HandlerRegistry()

    async def step(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        handled.append((cmd.command_type, cmd.data["n"]))
        return {"done": cmd.command_type}

    registry.register(DOMAIN, "StepFirst", step)
    registry.register(DOMAIN, "StepSecond", step)
    bus = CommandBus(pool)
    repo = PostgresProcessRepository(pool)
    worker = Worker(pool, DOMAIN, registry)
    worker_task = asyncio.create_task(worker.run(concurrency=2, poll_interval=0.05))
    killed = survivor = None
    try:
        killed = await start_router(tmp_path, "killed", database_url, "hang", 2)
        pid = await TwoSteps(bus, repo, REPLY_QUEUE, pool).start({"n": 7})
        await killed.expect("BUILDING")
        # inside the reply's transaction: the first step's reply is recorded, not committed
        assert await killed.kill() != 0
        # nothing of it committed: the reply unrecorded, still in the queue (hidden for 2 s)
        assert await rows(
            pool,
            "SELECT step_name, reply_outcome FROM commandbus.process_audit WHERE process_id = %s",
            pid,
        ) == [("FIRST", None)]
        assert len(await rows(pool, f"SELECT msg_id FROM pgmq.q_{REPLY_QUEUE}")) == 1
        survivor = await start_router(tmp_path, "survivor", database_url, "work", 30)
        for _ in range(300):
            process = await repo.get_by_id(DOMAIN, pid)
            if process is not None and process.status is ProcessStatus.COMPLETED:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"not completed: {process}\n{survivor.diagnostics()}")
        assert process.state == {"n": 7, "first": {"done": "StepFirst"},
                                 "second": {"done": "StepSecond"}}  # fmt: skip
        steps = await rows(
            pool,
            "SELECT step_name, reply_outcome FROM commandbus.process_audit"
            " WHERE process_id = %s ORDER BY id",
            pid,
        )
        assert steps == [("FIRST", "SUCCESS"), ("SECOND", "SUCCESS")]
        cmds = await rows(
            pool,
            "SELECT command_type, status FROM commandbus.command WHERE domain = %s"
            " ORDER BY created_at",
            DOMAIN,
        )
        assert cmds == [("StepFirst", "COMPLETED"), ("StepSecond", "COMPLETED")]
        assert sorted(handled) == [("StepFirst", 7), ("StepSecond", 7)]
        assert await rows(pool, f"SELECT msg_id FROM pgmq.q_{REPLY_QUEUE}") == []
        survivor.proc.send_signal(signal.SIGTERM)
        assert await survivor.wait() == 0 and "STOPPED" in survivor.lines
    finally:
        for proc in (killed, survivor):
            if proc is not None:
                await proc.aclose()
        await worker.stop(timeout=5)
        await worker_task
        await bus.close()
