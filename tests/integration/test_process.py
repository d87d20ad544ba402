"""Process managers against a real server: a two-step saga completing, a failing step
compensated, a step in the TSQ (WAITING_FOR_TSQ, then operator retry / cancel), a reply
delivered twice, process batches, and the rows as the predecessor writes them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Self
from uuid import UUID, uuid4

from itest_helpers import fetch, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BatchMetadata,
    BusinessRuleException,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    Reply,
    RetryPolicy,
    Worker,
)
from commandbus.ops import TroubleshootingQueue
from commandbus.pgmq.client import PgmqClient, PgmqMessage
from commandbus.process import (
    BaseProcessManager,
    PostgresProcessRepository,
    ProcessCommand,
    ProcessReplyRouter,
    ProcessStatus,
)
from commandbus.repositories.batch import PostgresBatchRepository

Pool = AsyncConnectionPool[Any]
DOMAIN = "shop"
REPLIES = "shop__process_replies"


class Step(StrEnum):
    RESERVE = "RESERVE"
    CHARGE = "CHARGE"
    RELEASE = "RELEASE"


@dataclass
class OrderState:
    order_id: str
    mode: str = "ok"
    reservation: str | None = None
    charged: bool = False
    released: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


class OrderSaga(BaseProcessManager[OrderState, Step]):
    process_type = "OrderSaga"  # type: ignore[assignment]
    domain = DOMAIN  # type: ignore[assignment]
    state_class = OrderState  # type: ignore[assignment]

    def create_initial_state(self, initial_data: dict[str, Any]) -> OrderState:
        return OrderState(**initial_data)

    def get_first_step(self, state: OrderState) -> Step:
        return Step.RESERVE

    async def build_command(self, step: Step, state: OrderState) -> ProcessCommand[Any]:
        data = {"order_id": state.order_id, "mode": state.mode}
        return ProcessCommand(command_type=str(step).title(), data=data)

    def update_state(self, state: OrderState, step: Step, reply: Reply) -> None:
        if step == Step.RESERVE and reply.data:
            state.reservation = reply.data["reservation"]
        elif step == Step.CHARGE:
            state.charged = reply.outcome.value == "SUCCESS"
        elif step == Step.RELEASE:
            state.released = True

    def get_next_step(self, current_step: Step, reply: Reply, state: OrderState) -> Step | None:
        return Step.CHARGE if current_step == Step.RESERVE else None

    def get_compensation_step(self, _step: Step) -> Step | None:
        return {Step.RESERVE: Step.RELEASE}.get(_step)


def registry(charges: list[str]) -> HandlerRegistry:
    reg = HandlerRegistry()
    failed_once: set[UUID] = set()

    @reg.handler(DOMAIN, "Reserve")
    async def reserve(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        return {"reservation": f"r-{cmd.data['order_id']}"}

    @reg.handler(DOMAIN, "Charge")
    async def charge(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        charges.append(cmd.data["order_id"])
        if cmd.data["mode"].startswith("declined"):
            raise BusinessRuleException("DECLINED", "card declined")
        if cmd.data["mode"] == "tsq" and cmd.command_id not in failed_once:
            failed_once.add(cmd.command_id)
            raise PermanentCommandError("GATEWAY_DOWN", "gateway down")
        return {"charged": True}

    @reg.handler(DOMAIN, "Release")
    async def release(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        if cmd.data["mode"] == "declined_release_fails":
            raise BusinessRuleException("NOT_RELEASED", "reservation expired")
        if cmd.data["mode"] == "declined_release_tsq" and cmd.command_id not in failed_once:
            failed_once.add(cmd.command_id)
            raise PermanentCommandError("STOCK_DOWN", "stock service down")
        return {"released": True}

    return reg


@dataclass
class Env:
    pool: Pool
    bus: CommandBus
    repo: PostgresProcessRepository
    saga: OrderSaga
    router: ProcessReplyRouter
    charges: list[str]

    async def status(self, pid: UUID) -> str:
        rows = await fetch(
            self.pool, "SELECT status FROM commandbus.process WHERE process_id = %s", pid
        )
        return str(rows[0][0])

    async def wait_status(self, pid: UUID, status: ProcessStatus, timeout: float = 20) -> None:
        async def check() -> bool:
            return await self.status(pid) == status.value

        await wait_until(check, timeout=timeout)

    async def audit(self, pid: UUID) -> list[tuple[Any, ...]]:
        return await fetch(
            self.pool,
            "SELECT step_name, command_type, command_data, reply_outcome, reply_data,"
            " received_at IS NOT NULL, command_id FROM commandbus.process_audit"
            " WHERE process_id = %s ORDER BY id",
            pid,
        )


@asynccontextmanager
async def environment(
    pool: Pool, *, worker: bool = True, router: bool = True
) -> AsyncIterator[Env]:
    bus = CommandBus(pool)
    repo = PostgresProcessRepository(pool)
    saga = OrderSaga(bus, repo, REPLIES, pool)
    rtr = ProcessReplyRouter(pool, repo, {"OrderSaga": saga}, REPLIES, DOMAIN,
                             visibility_timeout=5, tsq_check_interval=0.1)  # fmt: skip
    charges: list[str] = []
    wrk = Worker(pool, DOMAIN, registry(charges), visibility_timeout=10,
                 retry_policy=RetryPolicy(max_attempts=1, backoff_schedule=[0]))  # fmt: skip
    tasks = []
    if worker:
        tasks.append(asyncio.create_task(wrk.run(concurrency=4, poll_interval=0.05)))
    if router:
        tasks.append(asyncio.create_task(rtr.run(concurrency=4, poll_interval=0.05)))
    try:
        yield Env(pool, bus, repo, saga, rtr, charges)
    finally:
        if worker:
            await wrk.stop(timeout=5)
        await rtr.stop(timeout=5)
        await asyncio.gather(*tasks)
        await bus.close()


async def test_two_step_saga_completes_with_the_predecessors_rows(pool: Pool) -> None:
    async with environment(pool) as env:
        pid = await env.saga.start({"order_id": "o1"})
        await env.wait_status(pid, ProcessStatus.COMPLETED)

    (row,) = await fetch(
        pool,
        "SELECT domain, process_type, status, current_step, state, error_code, error_message,"
        " created_at, updated_at, completed_at, batch_id FROM commandbus.process"
        " WHERE process_id = %s",
        pid,
    )
    assert row[:7] == (
        DOMAIN, "OrderSaga", "COMPLETED", "CHARGE",
        {"order_id": "o1", "mode": "ok", "reservation": "r-o1", "charged": True,
         "released": False},
        None, None,
    )  # fmt: skip
    assert isinstance(row[9], datetime) and row[7] <= row[8] and row[10] is None
    steps = await env.audit(pid)
    assert [s[:6] for s in steps] == [
        ("RESERVE", "Reserve", {"order_id": "o1", "mode": "ok"}, "SUCCESS",
         {"reservation": "r-o1"}, True),
        ("CHARGE", "Charge", {"order_id": "o1", "mode": "ok"}, "SUCCESS", {"charged": True}, True),
    ]  # fmt: skip
    # the steps' commands: correlation_id = process_id, reply_to = the manager's reply queue
    cmds = await fetch(
        pool,
        "SELECT command_id, correlation_id, reply_queue, status FROM commandbus.command"
        " WHERE domain = %s ORDER BY created_at",
        DOMAIN,
    )
    assert [c[0] for c in cmds] == [s[6] for s in steps]
    assert {(c[1], c[2], c[3]) for c in cmds} == {(pid, REPLIES, "COMPLETED")}
    process = await env.repo.get_by_id(DOMAIN, pid)
    assert process is not None and process.status is ProcessStatus.COMPLETED
    trail = await env.repo.get_audit_trail(DOMAIN, pid)
    assert [e.step_name for e in trail] == ["RESERVE", "CHARGE"]
    assert await env.repo.get_completed_steps(DOMAIN, pid) == ["RESERVE", "CHARGE"]


async def test_failed_step_runs_the_compensations_and_ends_compensated(pool: Pool) -> None:
    async with environment(pool) as env:
        pid = await env.saga.start({"order_id": "o2", "mode": "declined"})
        await env.wait_status(pid, ProcessStatus.COMPENSATED)
    steps = await env.audit(pid)
    assert [(s[0], s[3]) for s in steps] == [
        ("RESERVE", "SUCCESS"), ("CHARGE", "FAILED"), ("RELEASE", "SUCCESS")
    ]  # fmt: skip
    assert steps[1][4]["error_code"] == "DECLINED"
    (row,) = await fetch(
        pool,
        "SELECT current_step, error_code, error_message, state->>'released', completed_at"
        " IS NOT NULL FROM commandbus.process WHERE process_id = %s",
        pid,
    )
    assert row == ("RELEASE", "DECLINED", "card declined", "true", True)


async def test_step_in_the_tsq_waits_then_retry_resumes_and_cancel_compensates(
    pool: Pool,
) -> None:
    tsq = TroubleshootingQueue(pool)
    async with environment(pool) as env:
        retried = await env.saga.start({"order_id": "o3", "mode": "tsq"})
        canceled = await env.saga.start({"order_id": "o4", "mode": "tsq"})
        await env.wait_status(retried, ProcessStatus.WAITING_FOR_TSQ)
        await env.wait_status(canceled, ProcessStatus.WAITING_FOR_TSQ)
        step_cmd = {pid: (await env.audit(pid))[1][6] for pid in (retried, canceled)}

        # retry: back to waiting at once (in the operator's transaction), then completes
        await tsq.operator_retry(DOMAIN, step_cmd[retried], operator="alice")
        assert await env.status(retried) in ("WAITING", "COMPLETED")
        await env.wait_status(retried, ProcessStatus.COMPLETED)

        # cancel: a CANCELED reply; the completed step is compensated
        await tsq.operator_cancel(DOMAIN, step_cmd[canceled], reason="gave up", operator="bob")
        await env.wait_status(canceled, ProcessStatus.COMPENSATED)
    assert [(s[0], s[3]) for s in await env.audit(retried)] == [
        ("RESERVE", "SUCCESS"), ("CHARGE", "SUCCESS")
    ]  # fmt: skip
    assert [(s[0], s[3]) for s in await env.audit(canceled)] == [
        ("RESERVE", "SUCCESS"), ("CHARGE", "CANCELED"), ("RELEASE", "SUCCESS")
    ]  # fmt: skip
    (row,) = await fetch(
        pool, "SELECT error_code, error_message FROM commandbus.process WHERE process_id = %s",
        canceled,
    )  # fmt: skip
    assert row == ("CANCELED", "gave up")


async def test_operator_complete_of_a_step_in_the_tsq_advances_the_process(pool: Pool) -> None:
    async with environment(pool) as env:
        pid = await env.saga.start({"order_id": "o5", "mode": "tsq"})
        await env.wait_status(pid, ProcessStatus.WAITING_FOR_TSQ)
        cmd = (await env.audit(pid))[1][6]
        await TroubleshootingQueue(pool).operator_complete(
            DOMAIN, cmd, result_data={"charged": True}, operator="eve"
        )
        await env.wait_status(pid, ProcessStatus.COMPLETED)
    assert (await env.audit(pid))[1][3:5] == ("SUCCESS", {"charged": True})


async def test_a_reply_delivered_twice_advances_the_process_once(pool: Pool) -> None:
    pgmq = PgmqClient(pool)
    async with environment(pool, worker=False, router=False) as env:
        pid = await env.saga.start({"order_id": "o6"})
        first = (await env.audit(pid))[0][6]
        reply = {"command_id": str(first), "correlation_id": str(pid), "outcome": "SUCCESS",
                 "result": {"reservation": "r-o6"}}  # fmt: skip
        ids = [await pgmq.send(REPLIES, reply), await pgmq.send(REPLIES, reply)]
        # the same message handled twice (a redelivery), and its duplicate, concurrently
        msg = PgmqMessage(ids[0], 1, "", "", reply)
        dup = PgmqMessage(ids[1], 1, "", "", reply)
        await asyncio.gather(env.router.dispatch(msg), env.router.dispatch(dup))
        await env.router.dispatch(msg)
    steps = await env.audit(pid)
    assert [(s[0], s[3]) for s in steps] == [("RESERVE", "SUCCESS"), ("CHARGE", None)]
    (n,) = (await fetch(pool, "SELECT count(*) FROM commandbus.command WHERE domain = %s", DOMAIN))[
        0
    ]
    assert n == 2  # RESERVE and one CHARGE
    assert await env.status(pid) == "WAITING"
    (left,) = (await fetch(pool, f"SELECT count(*) FROM pgmq.q_{REPLIES}"))[0]
    assert left == 0


async def test_process_batch_counts_processes(pool: Pool) -> None:
    batch_id = uuid4()
    batches = PostgresBatchRepository(pool)
    await batches.save(
        BatchMetadata(domain=DOMAIN, batch_id=batch_id, batch_type="PROCESS", total_count=3)
    )

    async def counters() -> tuple[Any, ...]:
        (row,) = await fetch(
            pool,
            "SELECT status, completed_count, failed_count, canceled_count,"
            " in_troubleshooting_count FROM commandbus.batch WHERE batch_id = %s",
            batch_id,
        )
        return row

    async with environment(pool) as env:
        ok = await env.saga.start({"order_id": "b1"}, batch_id=batch_id)
        declined = await env.saga.start({"order_id": "b2", "mode": "declined"}, batch_id=batch_id)
        stuck = await env.saga.start({"order_id": "b3", "mode": "tsq"}, batch_id=batch_id)
        await env.wait_status(ok, ProcessStatus.COMPLETED)
        await env.wait_status(declined, ProcessStatus.COMPENSATED)
        await env.wait_status(stuck, ProcessStatus.WAITING_FOR_TSQ)
        assert await counters() == ("IN_PROGRESS", 2, 0, 0, 1)
        # the repair tool agrees (nothing to repair)
        (refreshed,) = (await fetch(pool, "SELECT commandbus.refresh_batch_stats_v1(%s, %s)",
                                    DOMAIN, batch_id))[0]  # fmt: skip
        assert refreshed is False and await counters() == ("IN_PROGRESS", 2, 0, 0, 1)
        cmd = (await env.audit(stuck))[1][6]
        await TroubleshootingQueue(pool).operator_cancel(DOMAIN, cmd, reason="no")
        await env.wait_status(stuck, ProcessStatus.COMPENSATED)
    assert await counters() == ("COMPLETED", 3, 0, 0, 0)
    # a wrong counter is repaired from the process rows
    await fetch(pool, "UPDATE commandbus.batch SET completed_count = 1 WHERE batch_id = %s"
                " RETURNING 1", batch_id)  # fmt: skip
    await fetch(pool, "SELECT commandbus.refresh_batch_stats_v1(%s, %s)", DOMAIN, batch_id)
    assert (await counters())[1:] == (3, 0, 0, 0)


async def test_a_failing_compensation_ends_the_process_failed(pool: Pool) -> None:
    async with environment(pool) as env:
        pid = await env.saga.start({"order_id": "o7", "mode": "declined_release_fails"})
        await env.wait_status(pid, ProcessStatus.FAILED)
    assert [(s[0], s[3]) for s in await env.audit(pid)] == [
        ("RESERVE", "SUCCESS"), ("CHARGE", "FAILED"), ("RELEASE", "FAILED")
    ]  # fmt: skip
    (row,) = await fetch(
        pool, "SELECT error_code, completed_at IS NOT NULL FROM commandbus.process"
        " WHERE process_id = %s", pid,
    )  # fmt: skip
    assert row == ("NOT_RELEASED", True)


async def test_a_compensation_in_the_tsq_waits_and_resumes_compensating(pool: Pool) -> None:
    async with environment(pool) as env:
        pid = await env.saga.start({"order_id": "o8", "mode": "declined_release_tsq"})
        await env.wait_status(pid, ProcessStatus.WAITING_FOR_TSQ)
        release = (await env.audit(pid))[2]
        assert release[0] == "RELEASE"
        await TroubleshootingQueue(pool).operator_retry(DOMAIN, release[6])
        assert await env.status(pid) in ("COMPENSATING", "COMPENSATED")
        await env.wait_status(pid, ProcessStatus.COMPENSATED)
