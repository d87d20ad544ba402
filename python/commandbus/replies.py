"""Awaiting replies: request/reply over a reply queue without hand-written polling.

`ReplyConsumer(pool, reply_queue)` hands each reply of its queue to the waiter whose
correlation id it carries:

    async with ReplyConsumer(pool, "orders__replies") as replies:
        await bus.send("orders", "Quote", cid, data, correlation_id=corr,
                       reply_to="orders__replies")
        reply = await replies.wait_for(corr, timeout=10)
        # or, in one step: reply = await replies.request(bus, "orders", "Quote", data)

How it reads:

- One reading loop per consumer, shared by all its waiters; it runs only while someone waits.
  It polls (`poll_interval`, default 50 ms): the worker sends replies in its outcome flush with
  `pgmq.send_batch`, which does not NOTIFY, so there is nothing to listen to.
- A reply whose waiter is found is deleted from the queue, then handed over.
- A reply nobody here waits for is left in the queue: it stays hidden for `visibility_timeout`
  seconds (so another process sharing the queue sees it afterwards) and is kept in memory for
  half that time, so a waiter that registers just after its reply arrived gets it at once.
- A malformed reply, or one without a correlation id, can never be matched: it is archived
  (`pgmq.a_<queue>`), not deleted. A reply queue belongs to ReplyConsumers: do not share it with a
  process manager's reply router.
- A reply handed to a waiter that gave up (timeout, cancel) at that very moment is kept in
  memory for `visibility_timeout` seconds for a retrying waiter; after that it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from psycopg_pool import AsyncConnectionPool

from commandbus._validation import validate_queue_name, validate_uuid
from commandbus.exceptions import ValidationError, WorkerStoppedError
from commandbus.models import Reply, ReplyOutcome
from commandbus.pgmq.client import PgmqClient, PgmqMessage

if TYPE_CHECKING:
    from commandbus.bus import CommandBus

logger = logging.getLogger(__name__)

_MAX_ERROR_BACKOFF = 2.0


def _as_dict(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    return {"value": value}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def reply_from_message(message: Mapping[str, Any]) -> Reply:
    """Build a `Reply` from a reply queue message (the predecessor's keys).

    SUCCESS: `result` -> `data`. FAILED: `result.error_code` / `result.error_message` -> the
    error fields (`data` keeps the whole `result`, as the predecessor did). CANCELED: `reason` ->
    `error_message`. A non-object `result` becomes `{"value": result}`.

    Raises:
        ValueError: the message lacks a valid `command_id` or `outcome`.
    """
    try:
        command_id = UUID(str(message["command_id"]))
        outcome = ReplyOutcome(message["outcome"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"not a reply message: {exc!r}") from exc
    raw_corr = message.get("correlation_id")
    correlation_id = UUID(str(raw_corr)) if raw_corr else None
    result = _as_dict(message.get("result"))
    error_code = _text(message.get("error_code"))
    error_message = _text(message.get("error_message"))
    if outcome is ReplyOutcome.FAILED and result is not None:
        error_code = _text(result.get("error_code")) or error_code
        error_message = _text(result.get("error_message")) or error_message
    elif outcome is ReplyOutcome.CANCELED:
        error_message = _text(message.get("reason")) or error_message
    return Reply(
        command_id=command_id,
        correlation_id=correlation_id,
        outcome=outcome,
        data=result,
        error_code=error_code,
        error_message=error_message,
    )


@dataclass
class _Held:
    """A reply read before anyone here waited for it (msg_id None: already deleted)."""

    reply: Reply
    msg_id: int | None
    expires_at: float


class ReplyConsumer:
    """Hands the replies of one reply queue to the waiters of their correlation ids."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        reply_queue: str,
        *,
        poll_interval: float = 0.05,
        visibility_timeout: int = 2,
        batch_size: int = 100,
    ) -> None:
        """Args:
        pool: the psycopg async pool the queue is read with.
        reply_queue: the queue commands name in `reply_to` (by convention `{domain}__replies`);
            created if missing.
        poll_interval: seconds between reads while someone waits and the queue is empty.
        visibility_timeout: seconds a reply read but not matched stays hidden from other readers.
        batch_size: most replies read per poll.
        """
        self._queue = validate_queue_name(reply_queue, field="reply_queue")
        if not isinstance(poll_interval, int | float) or poll_interval <= 0:
            raise ValidationError("poll_interval", poll_interval, "must be a number > 0 (seconds)")
        for name, value in (("visibility_timeout", visibility_timeout), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(name, value, "must be an integer >= 1")
        self._pgmq = PgmqClient(pool)
        self._poll_interval = float(poll_interval)
        self._vt = visibility_timeout
        self._batch_size = batch_size
        self._waiters: dict[UUID, deque[asyncio.Future[Reply]]] = {}
        self._held: dict[UUID, deque[_Held]] = {}
        self._task: asyncio.Task[None] | None = None
        self._queue_ready = False
        self._closed = False

    @property
    def reply_queue(self) -> str:
        return self._queue

    @property
    def waiting(self) -> int:
        """How many `wait_for` calls are waiting."""
        return sum(len(q) for q in self._waiters.values())

    async def __aenter__(self) -> ReplyConsumer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reading for good; waiters still waiting get `WorkerStoppedError`."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(WorkerStoppedError("the reply consumer is closed"))
        self._waiters.clear()
        self._held.clear()

    # -- waiting ---------------------------------------------------------------------------

    async def wait_for(self, correlation_id: UUID | str, timeout: float | None = 30.0) -> Reply:
        """Wait for the reply carrying `correlation_id` and return it.

        Several commands may share a correlation id: each call receives one of their replies.

        Raises:
            TimeoutError: no reply within `timeout` seconds (None: wait without limit).
            WorkerStoppedError: the consumer was closed.
        """
        corr = validate_uuid(correlation_id, "correlation_id")
        _check_timeout(timeout)
        reply = await self._take_held(corr)
        if reply is not None:
            return reply
        return await self._await(corr, self._register(corr), timeout)

    async def request(
        self,
        bus: CommandBus,
        domain: str,
        command_type: str,
        data: dict[str, Any],
        *,
        command_id: UUID | None = None,
        correlation_id: UUID | None = None,
        max_attempts: int | None = None,
        timeout: float | None = 30.0,
    ) -> Reply:
        """Send a command with `reply_to` = this queue and wait for its reply.

        Raises what `CommandBus.send` raises, and TimeoutError / WorkerStoppedError.
        """
        _check_timeout(timeout)
        corr = validate_uuid(correlation_id, "correlation_id") if correlation_id else uuid4()
        fut = self._register(corr)
        try:
            await bus.send(
                domain,
                command_type,
                command_id or uuid4(),
                data,
                correlation_id=corr,
                reply_to=self._queue,
                max_attempts=max_attempts,
            )
        except BaseException:
            self._discard(corr, fut)
            fut.cancel()
            raise
        return await self._await(corr, fut, timeout)

    def _register(self, corr: UUID) -> asyncio.Future[Reply]:
        if self._closed:
            raise WorkerStoppedError("the reply consumer is closed")
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(corr, deque()).append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"rcmd-replies-{self._queue}")
        return fut

    def _discard(self, corr: UUID, fut: asyncio.Future[Reply]) -> None:
        waiters = self._waiters.get(corr)
        if waiters is not None and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self._waiters[corr]

    async def _await(self, corr: UUID, fut: asyncio.Future[Reply], timeout: float | None) -> Reply:
        try:
            await asyncio.wait({fut}, timeout=timeout)
        except asyncio.CancelledError:
            self._discard(corr, fut)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._hold(fut.result(), None, self._vt)  # delivered too late: keep it
            raise
        self._discard(corr, fut)
        if fut.done():
            return fut.result()
        fut.cancel()
        raise TimeoutError(f"no reply for correlation_id {corr} on {self._queue} in {timeout}s")

    # -- replies read before their waiter --------------------------------------------------

    def _hold(self, reply: Reply, msg_id: int | None, ttl: float) -> None:
        assert reply.correlation_id is not None
        held = _Held(reply, msg_id, time.monotonic() + ttl)
        self._held.setdefault(reply.correlation_id, deque()).append(held)

    def _expire_held(self) -> None:
        now = time.monotonic()
        for corr in list(self._held):
            kept = deque(h for h in self._held[corr] if h.expires_at > now)
            if kept:
                self._held[corr] = kept
            else:
                del self._held[corr]

    async def _take_held(self, corr: UUID) -> Reply | None:
        """A held reply for `corr`, deleted from the queue first (None if there is none)."""
        self._expire_held()
        while corr in self._held:
            held = self._held[corr].popleft()
            if not self._held[corr]:
                del self._held[corr]
            if held.msg_id is None or await self._pgmq.delete(self._queue, held.msg_id):
                return held.reply
        return None

    # -- the reading loop ------------------------------------------------------------------

    async def _run(self) -> None:
        errors = 0
        while self._waiters and not self._closed:
            try:
                if not self._queue_ready:
                    await self._pgmq.create_queue(self._queue)
                    self._queue_ready = True
                read = await self._poll_once()
                errors = 0
            except Exception:
                errors += 1
                delay = min(_MAX_ERROR_BACKOFF, self._poll_interval * 2**errors)
                logger.warning("reading replies from %s failed", self._queue, exc_info=True)
                await asyncio.sleep(delay)
                continue
            if read < self._batch_size:
                await asyncio.sleep(self._poll_interval)

    async def _poll_once(self) -> int:
        """Read one batch and hand out what matches; returns how many messages were read."""
        msgs = await self._pgmq.read(self._queue, self._vt, self._batch_size)
        self._expire_held()
        matched: list[tuple[PgmqMessage, Reply]] = []
        unusable: list[int] = []
        free = {corr: len(waiters) for corr, waiters in self._waiters.items()}
        for msg in msgs:
            try:
                reply = reply_from_message(msg.message)
            except ValueError:
                logger.warning("malformed reply %s on %s archived", msg.msg_id, self._queue)
                unusable.append(msg.msg_id)
                continue
            if reply.correlation_id is None:
                logger.warning(
                    "reply %s on %s has no correlation_id: archived", msg.msg_id, self._queue
                )
                unusable.append(msg.msg_id)
            elif free.get(reply.correlation_id, 0) > 0:
                free[reply.correlation_id] -= 1
                matched.append((msg, reply))
            else:
                self._hold(reply, msg.msg_id, self._vt / 2)
        if unusable:
            await self._pgmq.archive_batch(self._queue, unusable)
        if matched:
            deleted = set(
                await self._pgmq.delete_batch(self._queue, [m.msg_id for m, _ in matched])
            )
            for msg, reply in matched:
                if msg.msg_id in deleted:
                    self._deliver(reply)
        return len(msgs)

    def _deliver(self, reply: Reply) -> None:
        assert reply.correlation_id is not None
        waiters = self._waiters.get(reply.correlation_id)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(reply)
                break
        else:
            self._hold(reply, None, self._vt)  # its waiter left meanwhile
        if waiters is not None and not waiters:
            self._waiters.pop(reply.correlation_id, None)


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ValidationError("timeout", timeout, "must be None or a number > 0 (seconds)")


async def wait_for_reply(
    pool: AsyncConnectionPool[Any],
    reply_queue: str,
    correlation_id: UUID | str,
    timeout: float | None = 30.0,
) -> Reply:
    """One-shot: wait for one reply with its own consumer (use a shared `ReplyConsumer` when
    many requests are in flight)."""
    async with ReplyConsumer(pool, reply_queue) as consumer:
        return await consumer.wait_for(correlation_id, timeout)


__all__ = ["ReplyConsumer", "reply_from_message", "wait_for_reply"]
