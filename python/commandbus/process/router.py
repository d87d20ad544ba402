"""`ProcessReplyRouter`: reads a process manager's reply queue and advances each process.

Each reply is handled in one transaction on one connection: the process row is locked
(`FOR UPDATE`: one reply of a process at a time), the manager advances the process (the step's
`process_audit` row gets the reply, state and status change, the next step's command is sent
with `CommandBus.send(..., conn=conn)`), and the reply message is deleted. A crash anywhere
before the commit leaves nothing behind: the message becomes visible again after
`visibility_timeout` and is handled then. A reply delivered twice (that redelivery, or a
duplicate message) finds its step already answered and only deletes the message.

The router also finds processes whose pending step's command went to the troubleshooting
queue (the worker's flush moves it there and sends no reply): every `tsq_check_interval`
seconds it runs `process_tsq_sync_v1`, which puts them into WAITING_FOR_TSQ (and back to
waiting once an operator retried the command; `operator_retry` also does that at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool, PoolTimeout

from commandbus import _db
from commandbus._validation import validate_domain, validate_queue_name
from commandbus.models import Reply
from commandbus.pgmq.client import PgmqClient, PgmqMessage
from commandbus.process.base import BaseProcessManager
from commandbus.process.repository import ProcessRepository
from commandbus.replies import reply_from_message

if TYPE_CHECKING:
    from commandbus.sync.health import HealthStatus

logger = logging.getLogger(__name__)

_MAX_ERROR_BACKOFF = 5.0


class ProcessReplyRouter:
    """Routes the replies of one reply queue to the process managers of one domain, by the
    process type of the process each reply belongs to (correlation_id = process_id)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        process_repo: ProcessRepository,
        managers: dict[str, BaseProcessManager[Any, Any]],
        reply_queue: str,
        domain: str,
        visibility_timeout: int = 30,
        *,
        tsq_check_interval: float = 5.0,
        health: HealthStatus | None = None,
    ) -> None:
        """Args:
        pool: connections for reading and for each reply's transaction.
        process_repo: reads the process rows (in the reply's transaction).
        managers: process_type -> its manager.
        reply_queue: the queue the managers' steps reply to.
        domain: the domain of the processes.
        visibility_timeout: seconds a read reply stays hidden; a reply not handled by then
            (crash, slow step) is read again.
        tsq_check_interval: seconds between the checks for steps stuck in the TSQ.
        health: when given (`SyncProcessReplyRouter` gives its `health_status`), each reply
            handled by `run` is recorded in it: a success, or a failure when its handling
            raised (rolled back, read again later; a `PoolTimeout` also counts as a pool
            exhaustion); a failed read counts as a failure, or as a pool exhaustion when it
            was a `PoolTimeout`.
        """
        self._pool = pool
        self._process_repo = process_repo
        self._managers = managers
        self._reply_queue = validate_queue_name(reply_queue)
        self._domain = validate_domain(domain)
        self._visibility_timeout = visibility_timeout
        self._tsq_check_interval = tsq_check_interval
        self._pgmq = PgmqClient(pool)
        self._running = False
        self._stop_event: asyncio.Event | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self.health = health
        #: start times (monotonic) of the replies being handled, for the sync router's stuck check
        self.started: dict[asyncio.Task[Any], float] = {}

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def reply_queue(self) -> str:
        return self._reply_queue

    @property
    def domain(self) -> str:
        return self._domain

    async def run(
        self, concurrency: int = 10, poll_interval: float = 1.0, use_notify: bool = True
    ) -> None:
        """Handle replies until `stop()` (up to `concurrency` at once; at most `poll_interval`
        seconds between reads when the queue is idle). `use_notify` is accepted for
        compatibility: replies are sent by the worker's flush without a NOTIFY, so the router
        polls."""
        self._running = True
        self._stop_event = stop = asyncio.Event()
        slots = asyncio.Semaphore(concurrency)
        await self._pgmq.create_queue(self._reply_queue)
        logger.info("process reply router on %s (concurrency=%d)", self._reply_queue, concurrency)
        next_check = 0.0
        errors = 0
        try:
            while not stop.is_set():
                try:
                    if time.monotonic() >= next_check:
                        await self.check_troubleshooting()
                        next_check = time.monotonic() + self._tsq_check_interval
                    read = await self._read_and_dispatch(slots, concurrency)
                    errors = 0
                except Exception as exc:
                    errors += 1
                    logger.exception("process reply router on %s: read failed", self._reply_queue)
                    if self.health is not None:  # the predecessor's accounting of a read
                        if isinstance(exc, PoolTimeout):
                            self.health.record_pool_exhaustion()
                        else:
                            self.health.record_failure(exc)
                    read = 0
                    delay = min(_MAX_ERROR_BACKOFF, poll_interval * 2**errors)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                if read == 0:
                    wait = min(poll_interval, max(0.0, next_check - time.monotonic()))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(wait, 0.001))
        finally:
            await self._wait_for_in_flight()
            self._running = False
            logger.info("process reply router on %s stopped", self._reply_queue)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop reading; wait up to `timeout` seconds for the replies being handled."""
        if self._stop_event is None:
            return
        self._stop_event.set()
        if self._in_flight:
            try:
                await asyncio.wait_for(self._wait_for_in_flight(), timeout)
            except TimeoutError:
                logger.warning("process reply router: replies still in flight at stop")

    async def check_troubleshooting(self) -> int:
        """Put processes whose pending step's command is in the troubleshooting queue into
        WAITING_FOR_TSQ (and those whose command left it without a reply back to waiting);
        returns how many changed. `run` calls it every `tsq_check_interval` seconds."""
        changed = await _db.fetch_value(
            self._pool, "process_tsq_sync", self._domain, None, domain=self._domain
        )
        if changed:
            logger.info("%d process(es) of %s changed WAITING_FOR_TSQ", changed, self._domain)
        return int(changed or 0)

    async def _wait_for_in_flight(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _read_and_dispatch(self, slots: asyncio.Semaphore, concurrency: int) -> int:
        free = concurrency - len(self._in_flight)
        if free <= 0:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
            return 1
        messages = await self._pgmq.read(self._reply_queue, self._visibility_timeout, free)
        for msg in messages:
            task = asyncio.create_task(self._handle(msg, slots))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(messages)

    async def _handle(self, msg: PgmqMessage, slots: asyncio.Semaphore) -> None:
        async with slots:
            health = self.health
            task = asyncio.current_task()
            if task is not None:
                self.started[task] = time.monotonic()
            try:
                await self.dispatch(msg)
            except Exception as exc:
                # Rolled back: the reply is read again after the visibility timeout.
                logger.exception("reply %s on %s failed", msg.msg_id, self._reply_queue)
                if health is not None:
                    if isinstance(exc, PoolTimeout):
                        health.record_pool_exhaustion()
                    health.record_failure(exc)
            else:
                if health is not None:
                    health.record_success()
            finally:
                if task is not None:
                    self.started.pop(task, None)

    async def dispatch(self, msg: PgmqMessage) -> None:
        """Handle one reply message in one transaction (the process advanced and the message
        deleted together)."""
        try:
            reply: Reply = reply_from_message(msg.message)
        except ValueError:
            logger.warning("malformed reply %s on %s archived", msg.msg_id, self._reply_queue)
            await self._pgmq.archive(self._reply_queue, msg.msg_id)
            return
        async with _db.bounded(self._pool), self._pool.connection() as conn, conn.transaction():
            process = None
            if reply.correlation_id is not None and await _db.fetch_one(
                conn, "process_lock", self._domain, reply.correlation_id, domain=self._domain
            ):
                process = await self._process_repo.get_by_id(
                    self._domain, reply.correlation_id, conn=conn
                )
            manager = None if process is None else self._managers.get(process.process_type)
            if process is None:
                logger.warning("reply %s: no process %s in %s, discarded", msg.msg_id,
                               reply.correlation_id, self._domain)  # fmt: skip
            elif manager is None:
                logger.error("reply %s: no manager for process type %s, discarded",
                             msg.msg_id, process.process_type)  # fmt: skip
            else:
                await manager.handle_reply(reply, process, conn=conn)
            await self._pgmq.delete(self._reply_queue, msg.msg_id, conn=conn)


__all__ = ["ProcessReplyRouter"]
