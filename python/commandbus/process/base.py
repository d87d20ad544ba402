"""`BaseProcessManager`: a saga over commands, with typed state and steps.

A process sends one command per step (correlation_id = the process id, reply_to = the
manager's reply queue) and advances when the reply comes back through the reply router
(`ProcessReplyRouter`), in the router's transaction: the reply recorded on the step's
`process_audit` row, the state and status updated, the next step's command sent, and the reply
message deleted, all commit together or not at all.

Where the predecessor differed (on purpose):

* A step that fails (FAILED reply: a BusinessRuleException; or CANCELED: an operator canceled
  its command in the troubleshooting queue) runs the compensations of the completed steps one
  at a time, newest first, each after the previous one's reply (status COMPENSATING); the
  process then ends COMPENSATED (the predecessor sent them all at once and ended it CANCELED
  or COMPLETED-like). A compensation that fails ends the process FAILED.
* A reply delivered twice advances the process once: the step's reply is recorded only on a
  step that has none yet (`update_step_reply` returns False otherwise) and nothing else happens.
* A step whose command sits in the troubleshooting queue puts the process in WAITING_FOR_TSQ
  (found by the router, see `ProcessReplyRouter`); the operator's retry puts it back to
  waiting, complete (a SUCCESS reply) advances it, cancel (a CANCELED reply) compensates it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from uuid import UUID, uuid4

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus.models import Reply, ReplyOutcome
from commandbus.process.models import (
    TERMINAL_STATUSES,
    ProcessAuditEntry,
    ProcessCommand,
    ProcessMetadata,
    ProcessState,
    ProcessStatus,
)

if TYPE_CHECKING:
    from commandbus.bus import CommandBus
    from commandbus.process.repository import ProcessRepository

logger = logging.getLogger(__name__)

TState = TypeVar("TState", bound=ProcessState)
TStep = TypeVar("TStep", bound=StrEnum)

_FAILURES = (ReplyOutcome.FAILED, ReplyOutcome.CANCELED)

#: True while a manager runs in sync mode (under `SyncProcessReplyRouter`, or in
#: `handle_reply_sync`): its steps' commands are then built by `build_command_sync` when the
#: subclass overrides it, as the predecessor's sync mode did.
_SYNC_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "commandbus_process_sync_mode", default=False
)


class BaseProcessManager(ABC, Generic[TState, TStep]):
    """Base class of process managers: subclass it with your state class and step enum.

    Implement `process_type`, `domain`, `state_class`, `create_initial_state`,
    `get_first_step`, `build_command`, `update_state` and `get_next_step`; override
    `get_compensation_step` for steps that must be undone when a later step fails.

    Sync mode (the manager run by `commandbus.sync.process.SyncProcessReplyRouter`, or
    `handle_reply_sync`): the steps' commands are built by `build_command_sync` when you
    override it (in a worker thread: it may block), else by `build_command`. The hook
    `before_send_command_sync` cannot be honoured (see its docstring): a manager overriding
    it is refused by the sync router and by `handle_reply_sync` with a `TypeError`; override
    the async `before_send_command` instead, which runs in sync mode too.
    """

    def __init__(
        self,
        command_bus: CommandBus,
        process_repo: ProcessRepository,
        reply_queue: str,
        pool: AsyncConnectionPool[Any],
        *,
        sync_pool: Any = None,
        sync_command_bus: Any = None,
        sync_process_repo: Any = None,
    ) -> None:
        """Args:
        command_bus: sends the steps' commands (on the caller's connection).
        process_repo: persists the process rows.
        reply_queue: the queue the steps' replies go to (the router reads it).
        pool: for `start` and `handle_reply` called without a connection.
        sync_pool, sync_command_bus, sync_process_repo: accepted for compatibility with the
            predecessor's signature; unused (the sync router runs this manager on its own
            event loop).
        """
        self.command_bus = command_bus
        self.process_repo = process_repo
        self.reply_queue = reply_queue
        self.pool = pool
        self._sync_pool = sync_pool
        self._sync_command_bus = sync_command_bus
        self._sync_process_repo = sync_process_repo

    # -- what a process defines ------------------------------------------------------------

    @property
    @abstractmethod
    def process_type(self) -> str:
        """The unique process type (stored on the process row; the router dispatches on it)."""

    @property
    @abstractmethod
    def domain(self) -> str:
        """The domain of the process rows and of the steps' commands."""

    @property
    @abstractmethod
    def state_class(self) -> type[TState]:
        """The state class (its `from_dict` reads the stored state back)."""

    @abstractmethod
    def create_initial_state(self, initial_data: dict[str, Any]) -> TState:
        """Typed state from the data given to `start`."""

    @abstractmethod
    def get_first_step(self, state: TState) -> TStep:
        """The first step."""

    @abstractmethod
    async def build_command(self, step: TStep, state: TState) -> ProcessCommand[Any]:
        """The command of a step (forward steps and compensations alike)."""

    @abstractmethod
    def update_state(self, state: TState, step: TStep, reply: Reply) -> None:
        """Update the state in place from a step's reply (SUCCESS or FAILED; a compensation's
        reply too)."""

    @abstractmethod
    def get_next_step(self, current_step: TStep, reply: Reply, state: TState) -> TStep | None:
        """The step after a successful one, or None when the process is complete."""

    def get_compensation_step(self, _step: TStep) -> TStep | None:
        """The step that undoes `_step` (None: nothing to undo). Step names read back from the
        database arrive as str, equal to your StrEnum members."""
        return None

    async def before_send_command(
        self,
        process: ProcessMetadata[TState, TStep],
        step: TStep,
        command_id: UUID,
        command_payload: dict[str, Any],
        conn: AsyncConnection[Any],
    ) -> None:
        """Hook: runs in the step's transaction just before its command is sent."""

    def build_command_sync(self, step: TStep, state: TState) -> ProcessCommand[Any]:
        """The command of a step, from synchronous code. The default runs the async
        `build_command` on a private event loop (`asyncio.run`: call it outside a running
        loop). Override it for native sync behaviour: in sync mode (under
        `SyncProcessReplyRouter` or in `handle_reply_sync`) an override is what builds the
        steps' commands, called in a worker thread (it may block)."""
        return asyncio.run(self.build_command(step, state))

    def before_send_command_sync(
        self,
        process: ProcessMetadata[TState, TStep],
        step: TStep,
        command_id: UUID,
        command_payload: dict[str, Any],
        conn: Any,
    ) -> None:
        """The predecessor's sync hook (called with the caller's sync connection just before a
        step's command was sent). Not supported: in sync mode the step is sent on an async
        connection inside the reply's transaction, so no sync connection in that transaction
        exists to give it. A manager overriding it is refused (`TypeError`) by
        `SyncProcessReplyRouter` and `handle_reply_sync` rather than silently never called;
        override the async `before_send_command` instead (same arguments, the reply's
        `AsyncConnection`), which runs in the step's transaction in every mode."""

    def _check_sync_mode(self) -> None:
        """Raise TypeError when this manager overrides a sync hook sync mode cannot call."""
        if type(self).before_send_command_sync is not BaseProcessManager.before_send_command_sync:
            raise TypeError(
                f"{type(self).__name__} overrides before_send_command_sync, which is not "
                "supported: steps are sent on the reply's async connection, so no sync "
                "connection in that transaction exists. Override the async "
                "before_send_command(process, step, command_id, command_payload, conn) instead "
                "(it runs in the step's transaction, under SyncProcessReplyRouter too)."
            )

    # -- running ---------------------------------------------------------------------------

    async def start(
        self,
        initial_data: dict[str, Any],
        conn: AsyncConnection[Any] | None = None,
        batch_id: UUID | None = None,
    ) -> UUID:
        """Start a process: its row and its first step's command, in one transaction (the
        caller's with `conn`). `batch_id` links it to a process batch (batch_type PROCESS),
        whose counters then follow the process's status. Returns the process id."""
        state = self.create_initial_state(initial_data)
        now = datetime.now(UTC)
        process = ProcessMetadata[TState, TStep](
            domain=self.domain,
            process_id=uuid4(),
            process_type=self.process_type,
            state=state,
            status=ProcessStatus.PENDING,
            current_step=None,
            created_at=now,
            updated_at=now,
            batch_id=batch_id,
        )

        async def run(c: AsyncConnection[Any]) -> None:
            await self.process_repo.save(process, conn=c)
            await self._execute_step(process, self.get_first_step(state), c)

        if conn is not None:
            await run(conn)
        else:
            async with _db.bounded(self.pool), self.pool.connection() as own, own.transaction():
                await run(own)
        logger.info("started process %s.%s (%s)", self.domain, process.process_id,
                    self.process_type)  # fmt: skip
        return process.process_id

    async def handle_reply(
        self,
        reply: Reply,
        process: ProcessMetadata[Any, Any],
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Advance the process with a step's reply, in one transaction (the caller's with
        `conn`: the router's, which also deletes the reply message). Call it with the process
        row locked (the router does): a reply whose step already has one changes nothing."""
        if isinstance(process.state, dict):
            process.state = self.state_class.from_dict(process.state)
        typed: ProcessMetadata[TState, TStep] = process

        async def run(c: AsyncConnection[Any]) -> None:
            await self._advance(typed, reply, c)

        if conn is not None:
            await run(conn)
        else:
            async with _db.bounded(self.pool), self.pool.connection() as own, own.transaction():
                await run(own)

    def handle_reply_sync(
        self,
        reply: Reply,
        process: ProcessMetadata[Any, Any],
        conn: Any = None,
    ) -> None:
        """`handle_reply` from synchronous code (outside a running loop), in sync mode: on a
        private event loop (`asyncio.run`), in a transaction of its own on `pool`.

        Raises:
            TypeError: `conn` given. The predecessor could run the handling on a sync
                connection in the caller's transaction; here the process is advanced and the
                next step sent on an async connection, which cannot join a sync connection's
                transaction. Call it without `conn` (its own transaction), or let
                `SyncProcessReplyRouter` handle the replies (the reply and its message deleted
                in one transaction), or call `await handle_reply(reply, process, conn=...)`
                with an `AsyncConnection` to use your transaction. Also raised when the
                manager overrides `before_send_command_sync` (see there).
        """
        if conn is not None:
            raise TypeError(
                "handle_reply_sync(conn=...) is not supported: the reply is handled on an "
                "async connection, which cannot join your sync connection's transaction. Call "
                "handle_reply_sync(reply, process) without conn (its own transaction), use "
                "SyncProcessReplyRouter, or await handle_reply(reply, process, conn=...) with "
                "an AsyncConnection."
            )
        self._check_sync_mode()

        async def run() -> None:
            _SYNC_MODE.set(True)
            await self.handle_reply(reply, process)

        asyncio.run(run())

    async def _advance(
        self, process: ProcessMetadata[TState, TStep], reply: Reply, conn: AsyncConnection[Any]
    ) -> None:
        pid = process.process_id
        if ProcessStatus(process.status) in TERMINAL_STATUSES:
            logger.warning("reply %s for process %s which is %s: ignored", reply.command_id,
                           pid, ProcessStatus(process.status).value)  # fmt: skip
            return
        if not await self._record_reply(process, reply, conn):
            logger.info("reply %s for process %s already applied: ignored", reply.command_id, pid)
            return
        trail = await self.process_repo.get_audit_trail(process.domain, pid, conn=conn)
        index = next((i for i, e in enumerate(trail) if e.command_id == reply.command_id), None)
        trigger = next((i for i, e in enumerate(trail) if e.reply_outcome in _FAILURES), None)
        step: Any = trail[index].step_name if index is not None else process.current_step
        if step is None:
            logger.error("reply %s for process %s with no current step", reply.command_id, pid)
            return

        if trigger is not None and (index is None or index > trigger):
            # A compensation's reply.
            if reply.outcome is not ReplyOutcome.CANCELED:
                self.update_state(process.state, step, reply)
            if reply.outcome is ReplyOutcome.SUCCESS:
                await self._compensate_next(process, trail, trigger, conn)
            else:
                process.status = ProcessStatus.FAILED
                process.error_code = reply.error_code or reply.outcome.value
                process.error_message = reply.error_message
                process.completed_at = datetime.now(UTC)
                await self.process_repo.update(process, conn=conn)
                logger.error("process %s: compensation %s %s", pid, step, reply.outcome.value)
            return

        if reply.outcome in _FAILURES:
            # The step failed (business rule) or its command was canceled in the TSQ.
            if reply.outcome is ReplyOutcome.FAILED:
                self.update_state(process.state, step, reply)
            process.error_code = reply.error_code or reply.outcome.value
            process.error_message = reply.error_message
            logger.info("process %s: step %s %s, compensating", pid, step, reply.outcome.value)
            await self._compensate_next(process, trail, trigger, conn)
            return

        self.update_state(process.state, step, reply)
        next_step = self.get_next_step(step, reply, process.state)
        if next_step is None:
            await self._complete_process(process, conn)
        else:
            await self._execute_step(process, next_step, conn)

    async def _compensate_next(
        self,
        process: ProcessMetadata[TState, TStep],
        trail: list[ProcessAuditEntry],
        trigger: int | None,
        conn: AsyncConnection[Any],
    ) -> None:
        """Send the next compensation (completed forward steps, newest first), or end the
        process COMPENSATED when none is left."""
        cut = len(trail) if trigger is None else trigger
        done_forward = [e.step_name for e in trail[:cut] if e.reply_outcome is ReplyOutcome.SUCCESS]
        compensations = [
            comp
            for name in reversed(done_forward)
            if (comp := self.get_compensation_step(name)) is not None  # type: ignore[arg-type]
        ]
        done = sum(1 for e in trail[cut + 1 :] if e.reply_outcome is ReplyOutcome.SUCCESS)
        if done < len(compensations):
            await self._execute_step(
                process, compensations[done], conn, status=ProcessStatus.COMPENSATING
            )
            return
        process.status = ProcessStatus.COMPENSATED
        process.completed_at = datetime.now(UTC)
        await self.process_repo.update(process, conn=conn)
        logger.info("process %s compensated", process.process_id)

    async def _execute_step(
        self,
        process: ProcessMetadata[TState, TStep],
        step: TStep,
        conn: AsyncConnection[Any],
        *,
        status: ProcessStatus = ProcessStatus.WAITING_FOR_REPLY,
    ) -> UUID:
        """Send a step's command and record it (audit row, process row) on `conn`."""
        if (
            _SYNC_MODE.get()
            and type(self).build_command_sync is not BaseProcessManager.build_command_sync
        ):
            command = await asyncio.to_thread(self.build_command_sync, step, process.state)
        else:
            command = await self.build_command(step, process.state)
        command_id = uuid4()
        to_dict = getattr(command.data, "to_dict", None)
        payload: dict[str, Any] = to_dict() if callable(to_dict) else command.data
        await self.before_send_command(process, step, command_id, payload, conn)
        await self.command_bus.send(
            domain=self.domain,
            command_type=command.command_type,
            command_id=command_id,
            data=payload,
            correlation_id=process.process_id,
            reply_to=self.reply_queue,
            conn=conn,
        )
        process.current_step = step
        process.status = status
        process.updated_at = datetime.now(UTC)
        await self._record_command(process, step, command_id, command.command_type, payload, conn)
        await self.process_repo.update(process, conn=conn)
        return command_id

    async def _complete_process(
        self, process: ProcessMetadata[TState, TStep], conn: AsyncConnection[Any]
    ) -> None:
        process.status = ProcessStatus.COMPLETED
        process.completed_at = datetime.now(UTC)
        process.updated_at = process.completed_at
        await self.process_repo.update(process, conn=conn)
        logger.info("process %s completed", process.process_id)

    async def _record_command(
        self,
        process: ProcessMetadata[TState, TStep],
        step: TStep,
        command_id: UUID,
        command_type: str,
        command_data: dict[str, Any],
        conn: AsyncConnection[Any],
    ) -> None:
        entry = ProcessAuditEntry(
            step_name=str(step),
            command_id=command_id,
            command_type=command_type,
            command_data=command_data,
            sent_at=datetime.now(UTC),
        )
        await self.process_repo.log_step(process.domain, process.process_id, entry, conn=conn)

    async def _record_reply(
        self, process: ProcessMetadata[TState, TStep], reply: Reply, conn: AsyncConnection[Any]
    ) -> bool:
        """Record the reply on its step; False when the step already had one."""
        now = datetime.now(UTC)
        entry = ProcessAuditEntry(
            step_name=str(process.current_step) if process.current_step else "",
            command_id=reply.command_id,
            command_type="",
            command_data=None,
            sent_at=now,
            reply_outcome=reply.outcome,
            reply_data=reply.data,
            received_at=now,
        )
        applied = await self.process_repo.update_step_reply(
            process.domain, process.process_id, reply.command_id, entry, conn=conn
        )
        return applied is not False


__all__ = ["BaseProcessManager"]
