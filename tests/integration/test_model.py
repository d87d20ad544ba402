"""A model of the command lifecycle, checked against the real engine after every step.

A Hypothesis `RuleBasedStateMachine` sends commands (alone, with a reply queue, in batches),
claims them through the worker's step API (`Worker.receive`), reports each outcome (success,
transient failure retried or exhausted, permanent failure, business rule), lets leases run out
(the message's visibility is moved to now, as a lease that expired), which makes the next claim
redeliver the command or, its attempts used up, move it to the TSQ, reports outcomes under
leases that were superseded (the fence must drop them), and acts as an operator (retry, cancel,
complete). After every step the database must match a plain-Python model: each command's
status and attempts, its audit events in order, each batch's counters, status and audit, and
the replies in the reply queue.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest
from hypothesis import event as _hypothesis_event
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BatchCommand,
    BusinessRuleException,
    CommandBus,
    CommandNotFoundError,
    InvalidOperationError,
    PermanentCommandError,
    RetryPolicy,
    TransientCommandError,
    TroubleshootingQueue,
    Worker,
)
from commandbus.worker import ReceivedCommand
from fuzz_strategies import LONG_FACTOR, PROFILE

T = TypeVar("T")
DEFAULT_MAX_ATTEMPTS = 3
_domains = itertools.count()
#: How often each interesting branch ran (the test checks the machine reached them).
SEEN: Counter[str] = Counter()


def event(name: str) -> None:
    _hypothesis_event(name)
    SEEN[name] += 1


@dataclass
class ModelCommand:
    batch_id: UUID | None
    reply: bool
    max_attempts: int
    status: str = "PENDING"
    attempts: int = 0
    #: (msg_id, attempt) of the lease a claim handed out, while the command is IN_PROGRESS
    lease: tuple[int, int] | None = None
    lease_expired: bool = False
    audit: list[str] = field(default_factory=lambda: ["SENT"])
    replies: list[str] = field(default_factory=list)


@dataclass
class ModelBatch:
    total: int
    status: str = "PENDING"
    completed: int = 0
    failed: int = 0
    canceled: int = 0
    tsq: int = 0
    audit: list[str] = field(default_factory=list)

    def apply(self, completed: int = 0, failed: int = 0, canceled: int = 0, tsq: int = 0) -> None:
        """apply_batch_delta_v1, as the model sees it."""
        self.completed += completed
        self.failed += failed
        self.canceled += canceled
        self.tsq += tsq
        done = self.completed + self.failed + self.canceled
        if done >= self.total and self.tsq == 0:
            if self.status not in ("COMPLETED", "COMPLETED_WITH_FAILURES"):
                self.audit.append("BATCH_COMPLETED")
            self.status = "COMPLETED_WITH_FAILURES" if self.failed + self.canceled else "COMPLETED"
            event(f"batch {self.status}")
        elif self.status == "PENDING":
            self.status = "IN_PROGRESS"


class _Env:
    """The event loop and pool the machines share (one database per test)."""

    runner: asyncio.Runner
    pool: AsyncConnectionPool[Any]

    @classmethod
    def run(cls, coro: Awaitable[T]) -> T:
        return cls.runner.run(coro)  # type: ignore[arg-type]


OUTCOMES = st.sampled_from(["success", "transient", "crash", "permanent", "business_rule"])


class LifecycleMachine(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.domain = f"model{next(_domains)}"
        self.reply_queue = f"{self.domain}__replies"
        self.queue = f"{self.domain}__commands"
        pool = _Env.pool
        self.bus = CommandBus(pool)
        self.worker = Worker(
            pool,
            self.domain,
            visibility_timeout=300,
            retry_policy=RetryPolicy(max_attempts=DEFAULT_MAX_ATTEMPTS, backoff_schedule=[0]),
        )
        self.tsq = TroubleshootingQueue(pool)
        self.commands: dict[UUID, ModelCommand] = {}
        self.batches: dict[UUID, ModelBatch] = {}

    def teardown(self) -> None:
        _Env.run(self.worker.close())
        _Env.run(self.bus.close())

    # -- helpers -------------------------------------------------------------------------

    def _batch(self, cmd: ModelCommand) -> ModelBatch | None:
        return None if cmd.batch_id is None else self.batches[cmd.batch_id]

    def _cids(self, status: str) -> list[UUID]:
        return [cid for cid, c in self.commands.items() if c.status == status]

    # -- sending ---------------------------------------------------------------------------

    @rule(max_attempts=st.sampled_from([None, 1, 2, 3]), reply=st.booleans())
    def send(self, max_attempts: int | None, reply: bool) -> None:
        cid = uuid4()
        _Env.run(
            self.bus.send(
                self.domain, "Do", cid, {"n": len(self.commands)}, max_attempts=max_attempts,
                reply_to=self.reply_queue if reply else None,
            )
        )  # fmt: skip
        self.commands[cid] = ModelCommand(None, reply, max_attempts or DEFAULT_MAX_ATTEMPTS)

    @rule(
        members=st.lists(
            st.tuples(st.sampled_from([None, 1, 2]), st.booleans()), min_size=1, max_size=3
        )
    )
    def create_batch(self, members: list[tuple[int | None, bool]]) -> None:
        cmds = [
            BatchCommand("Do", uuid4(), {}, reply_to=self.reply_queue if reply else None,
                         max_attempts=ma)
            for ma, reply in members
        ]  # fmt: skip
        result = _Env.run(self.bus.create_batch(self.domain, cmds))
        self.batches[result.batch_id] = ModelBatch(total=len(cmds))
        for cmd, (ma, reply) in zip(cmds, members, strict=True):
            self.commands[cmd.command_id] = ModelCommand(
                result.batch_id, reply, ma or DEFAULT_MAX_ATTEMPTS
            )

    # -- claiming --------------------------------------------------------------------------

    @rule(target=handles)
    def receive(self) -> Any:
        """Claim everything claimable (the batch size is above what the model holds)."""
        got = _Env.run(self.worker.receive(batch_size=1000))
        expected: set[UUID] = set()
        for cid, cmd in self.commands.items():
            visible = cmd.status == "PENDING" or (cmd.status == "IN_PROGRESS" and cmd.lease_expired)
            if not visible:
                continue
            batch = self._batch(cmd)
            if cmd.attempts < cmd.max_attempts:
                if cmd.status == "IN_PROGRESS":
                    event("redelivery after an expired lease")
                expected.add(cid)
                cmd.attempts += 1
                cmd.status = "IN_PROGRESS"
                cmd.lease_expired = False
                cmd.audit.append("RECEIVED")
                if batch is not None and batch.status == "PENDING":
                    batch.status = "IN_PROGRESS"
                    batch.audit.append("BATCH_STARTED")
            else:  # delivered max_attempts times without an outcome: the TSQ, EXHAUSTED
                event("poison message moved to the TSQ by the claim")
                cmd.attempts += 1
                cmd.status = "IN_TROUBLESHOOTING_QUEUE"
                cmd.lease, cmd.lease_expired = None, False
                cmd.audit += ["RETRY_EXHAUSTED", "MOVED_TO_TSQ"]
                if batch is not None:
                    batch.apply(tsq=1)
        assert {r.command.command_id for r in got} == expected
        for r in got:
            cmd = self.commands[r.command.command_id]
            assert r.context.attempt == cmd.attempts
            assert r.context.max_attempts == cmd.max_attempts
            cmd.lease = (r.msg_id, r.context.attempt)
        return multiple(*got)

    @precondition(lambda self: bool(self._cids("IN_PROGRESS")))
    @rule(data=st.data())
    def lease_expires(self, data: st.DataObject) -> None:
        """The lease of an IN_PROGRESS command runs out: its message is visible again."""
        cid = data.draw(st.sampled_from(self._cids("IN_PROGRESS")))
        cmd = self.commands[cid]
        assert cmd.lease is not None
        _Env.run(
            _execute(
                f"UPDATE pgmq.q_{self.queue} SET vt = now() - interval '1 second'"
                " WHERE msg_id = %s",
                cmd.lease[0],
            )
        )
        cmd.lease_expired = True

    # -- outcomes --------------------------------------------------------------------------

    @rule(handle=consumes(handles), outcome=OUTCOMES)
    def report(self, handle: Any, outcome: str) -> None:
        """An outcome of a claimed command (its handle is used up)."""
        self._report(handle, outcome)

    @rule(handle=handles, outcome=OUTCOMES)
    def report_again(self, handle: Any, outcome: str) -> None:
        """An outcome under a handle that may have reported already, or whose lease may have
        been superseded by a redelivery (a handler outliving its lease): fenced then."""
        self._report(handle, outcome)

    def _report(self, handle: Any, outcome: str) -> None:
        received: ReceivedCommand = handle
        cid = received.command.command_id
        cmd = self.commands[cid]
        w = self.worker
        match outcome:
            case "success":
                _Env.run(w.complete(received, {"ok": True}))
            case "transient":
                _Env.run(w.fail(received, TransientCommandError("T", "try again")))
            case "crash":
                _Env.run(w.fail(received, RuntimeError("handler crashed")))
            case "permanent":
                _Env.run(w.fail_permanent(received, PermanentCommandError("P", "no")))
            case "business_rule":
                _Env.run(w.fail_business_rule(received, BusinessRuleException("B", "rule")))
        current = (received.msg_id, received.context.attempt)
        if cmd.status != "IN_PROGRESS" or cmd.lease != current:
            event("outcome under a superseded lease (fenced)")
            return  # a superseded lease: fenced, nothing changes
        batch = self._batch(cmd)
        cmd.lease, cmd.lease_expired = None, False
        event(f"outcome {outcome} applied at attempt {cmd.attempts} of {cmd.max_attempts}")
        if outcome == "success":
            cmd.status = "COMPLETED"
            cmd.audit.append("COMPLETED")
            if cmd.reply:
                cmd.replies.append("SUCCESS")
            if batch is not None:
                batch.apply(completed=1)
        elif outcome in ("transient", "crash"):
            cmd.audit.append("FAILED")
            if cmd.attempts < cmd.max_attempts:
                cmd.status = "PENDING"
                cmd.audit.append("RETRY_SCHEDULED")
            else:
                cmd.status = "IN_TROUBLESHOOTING_QUEUE"
                cmd.audit += ["RETRY_EXHAUSTED", "MOVED_TO_TSQ"]
                if batch is not None:
                    batch.apply(tsq=1)
        elif outcome == "permanent":
            cmd.status = "IN_TROUBLESHOOTING_QUEUE"
            cmd.audit.append("MOVED_TO_TSQ")
            if batch is not None:
                batch.apply(tsq=1)
        else:
            cmd.status = "FAILED"
            cmd.audit.append("BUSINESS_RULE_FAILED")
            if cmd.reply:
                cmd.replies.append("FAILED")
            if batch is not None:
                batch.apply(failed=1)

    # -- the operator ----------------------------------------------------------------------

    @precondition(lambda self: bool(self.commands))
    @rule(data=st.data(), action=st.sampled_from(["retry", "cancel", "complete"]))
    def operator(self, data: st.DataObject, action: str) -> None:
        in_tsq = self._cids("IN_TROUBLESHOOTING_QUEUE")
        # mostly a command the operator can act on, sometimes any (which must be refused)
        pick_tsq = bool(in_tsq) and data.draw(st.integers(0, 3)) > 0
        # insertion order, not sorted ids: the ids are random, a replay must pick the same
        cid = data.draw(st.sampled_from(list(in_tsq if pick_tsq else self.commands)))
        cmd = self.commands[cid]
        call = {
            "retry": lambda: self.tsq.operator_retry(self.domain, cid, operator="op"),
            "cancel": lambda: self.tsq.operator_cancel(self.domain, cid, "why", operator="op"),
            "complete": lambda: self.tsq.operator_complete(self.domain, cid, {"by": "op"}),
        }[action]
        event(f"operator {action} on {cmd.status}")
        if cmd.status != "IN_TROUBLESHOOTING_QUEUE":
            with pytest.raises(InvalidOperationError):
                _Env.run(call())
            return
        _Env.run(call())
        batch = self._batch(cmd)
        if action == "retry":
            cmd.status, cmd.attempts = "PENDING", 0
            cmd.audit.append("OPERATOR_RETRY")
            if batch is not None:
                batch.apply(tsq=-1)
        elif action == "cancel":
            cmd.status = "CANCELED"
            cmd.audit.append("OPERATOR_CANCEL")
            if cmd.reply:
                cmd.replies.append("CANCELED")
            if batch is not None:
                batch.apply(canceled=1, tsq=-1)
        else:
            cmd.status = "COMPLETED"
            cmd.audit.append("OPERATOR_COMPLETE")
            if cmd.reply:
                cmd.replies.append("SUCCESS")
            if batch is not None:
                batch.apply(completed=1, tsq=-1)

    @rule()
    def operator_on_unknown_command(self) -> None:
        with pytest.raises(CommandNotFoundError):
            _Env.run(self.tsq.operator_retry(self.domain, uuid4()))

    # -- the check after every step ------------------------------------------------------

    @invariant()
    def database_matches_the_model(self) -> None:
        if not self.commands:
            return
        rows = _Env.run(
            _fetch(
                "SELECT c.command_id, c.status, c.attempts,"
                " (SELECT array_agg(a.event_type ORDER BY a.audit_id) FROM commandbus.audit a"
                "   WHERE a.domain = c.domain AND a.command_id = c.command_id)"
                " FROM commandbus.command c WHERE c.domain = %s",
                self.domain,
            )
        )
        db = {r[0]: r[1:] for r in rows}
        assert set(db) == set(self.commands)
        for cid, cmd in self.commands.items():
            status, attempts, audit = db[cid]
            assert (status, attempts) == (cmd.status, cmd.attempts), cid
            assert audit == cmd.audit, (cid, audit, cmd.audit)
        if self.batches:
            batch_rows = _Env.run(
                _fetch(
                    "SELECT b.batch_id, b.status, b.total_count, b.completed_count,"
                    " b.failed_count, b.canceled_count, b.in_troubleshooting_count,"
                    " (SELECT array_agg(a.event_type ORDER BY a.audit_id) FROM commandbus.audit a"
                    "   WHERE a.domain = b.domain AND a.command_id = b.batch_id)"
                    " FROM commandbus.batch b WHERE b.domain = %s",
                    self.domain,
                )
            )
            for bid, *got in batch_rows:
                m = self.batches[bid]
                expected = [m.status, m.total, m.completed, m.failed, m.canceled, m.tsq,
                            m.audit or None]  # fmt: skip
                assert got == expected, (bid, got, expected)
        replies = _Env.run(
            _fetch(
                "SELECT (message->>'command_id')::uuid, message->>'outcome' FROM pgmq.q_"
                + self.reply_queue
                if any(c.replies for c in self.commands.values())
                else "SELECT NULL::uuid, NULL::text WHERE false"
            )
        )
        got_replies = Counter((r[0], r[1]) for r in replies)
        want = Counter((cid, o) for cid, c in self.commands.items() for o in c.replies)
        assert got_replies == want


async def _fetch(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with _Env.pool.connection() as conn:
        cur = await conn.execute(sql, params or None)
        return await cur.fetchall()


async def _execute(sql: str, *params: Any) -> None:
    async with _Env.pool.connection() as conn:
        await conn.execute(sql, params or None)


# Shrinking a failure replays many steps against the database: give it time.
@pytest.mark.timeout(1800)
def test_the_lifecycle_matches_the_model(database_url: str) -> None:
    with asyncio.Runner() as runner:

        async def open_pool() -> AsyncConnectionPool[Any]:
            pool = AsyncConnectionPool(database_url, min_size=1, max_size=4, open=False)
            await pool.open()
            return pool

        _Env.runner = runner
        _Env.pool = runner.run(open_pool())
        try:
            n = 15 * (LONG_FACTOR // 4 if PROFILE == "long" else 1)
            run_state_machine_as_test(
                LifecycleMachine,
                settings=settings(max_examples=n, stateful_step_count=40, deadline=None),
            )
        finally:
            runner.run(_Env.pool.close())
