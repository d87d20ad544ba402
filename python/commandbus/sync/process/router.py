"""`SyncProcessReplyRouter`: the process reply router for code without asyncio.

`run()` blocks the calling thread: it runs a `ProcessReplyRouter` on a private event loop in
that thread, with a private async pool opened on the conninfo of the sync pool given (its
connections get `statement_timeout`). Everything the async router promises holds: each reply
is handled in one transaction with the process advanced and the message deleted; a reply
delivered twice advances once; steps stuck in the troubleshooting queue are found.
`stop()` may be called from any thread (a signal handler, another thread).

The managers run in sync mode: a manager overriding `build_command_sync` has its steps'
commands built by it (in a worker thread); one overriding `before_send_command_sync` is
refused at construction (`TypeError`: the step is sent on the router's async connection, so
no sync connection in the reply's transaction exists; override `before_send_command`).
`health_status` counts each reply handled (success) or whose handling raised (failure), pool
timeouts (pool exhaustions) and each reply handled for longer than the visibility timeout
plus 5 s (a stuck thread, counted once), as the predecessor's router did.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from commandbus._dsn import keepalive_kwargs, pool_conninfo
from commandbus._validation import validate_domain, validate_queue_name
from commandbus.process.base import _SYNC_MODE, BaseProcessManager
from commandbus.process.repository import PostgresProcessRepository
from commandbus.process.router import ProcessReplyRouter
from commandbus.sync.health import HealthStatus
from commandbus.sync.timeouts import STUCK_THREAD_BUFFER_S, validate_timeouts

logger = logging.getLogger(__name__)


class SyncProcessReplyRouter:
    """Routes the replies of one reply queue to the process managers of one domain, from
    synchronous code.

    Example:
        pool = ConnectionPool(conninfo=DATABASE_URL)
        router = SyncProcessReplyRouter(pool, None, {"OrderSaga": saga},
                                        "orders__process_replies", "orders")
        router.run(concurrency=4)  # blocks until router.stop() (from another thread)
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        process_repo: Any,
        managers: dict[str, BaseProcessManager[Any, Any]],
        reply_queue: str,
        domain: str,
        *,
        visibility_timeout: int = 30,
        statement_timeout: int = 25000,
        tsq_check_interval: float = 5.0,
    ) -> None:
        """Args:
        pool: the sync pool whose conninfo the router's own async connections use.
        process_repo: a `PostgresProcessRepository` (any async `ProcessRepository` works: it
            is only called with the reply's connection); anything else (the predecessor's
            sync repository, None) means a `PostgresProcessRepository` of the router's own.
        managers: process_type -> its manager.
        reply_queue, domain, visibility_timeout, tsq_check_interval: as `ProcessReplyRouter`.
        statement_timeout: milliseconds, set on the router's connections; must be below
            `visibility_timeout`.

        Raises:
            ValueError: statement_timeout >= visibility_timeout (`validate_timeouts`).
            TypeError: a manager overrides `before_send_command_sync` (not supported: override
                the async `before_send_command`).
        """
        validate_timeouts(statement_timeout, visibility_timeout)
        for manager in managers.values():
            if isinstance(manager, BaseProcessManager):
                manager._check_sync_mode()
        self._pool = pool
        self._process_repo = process_repo
        self._managers = managers
        self._reply_queue = validate_queue_name(reply_queue)
        self._domain = validate_domain(domain)
        self._visibility_timeout = visibility_timeout
        self._statement_timeout = statement_timeout
        self._tsq_check_interval = tsq_check_interval
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._router: ProcessReplyRouter | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stop_timeout = 30.0
        self._health = HealthStatus()
        self._stopping = False
        self._done = threading.Event()
        self._done.set()

    @property
    def reply_queue(self) -> str:
        return self._reply_queue

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def health_status(self) -> HealthStatus:
        """Replies handled (successes), replies whose handling raised (failures: rolled
        back, read again after the visibility timeout), pool timeouts (exhaustions) and
        replies handled for longer than visibility_timeout + 5 s (stuck threads, once each)."""
        return self._health

    @property
    def is_running(self) -> bool:
        router = self._router
        return router is not None and router.is_running and not self._stopping

    @property
    def in_flight_count(self) -> int:
        """Replies being handled now."""
        router = self._router
        return 0 if router is None else len(router._in_flight)

    def run(
        self, concurrency: int = 4, poll_interval: float = 1.0, use_notify: bool = True
    ) -> None:
        """Handle replies until `stop()`: blocks the calling thread."""
        with self._lock:
            self._stopping = False
            self._done.clear()
        try:
            asyncio.run(self._main(concurrency, poll_interval, use_notify))
        finally:
            with self._lock:
                self._loop = None
                self._router = None
                self._stop_requested = None
            self._done.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop reading and wait up to `timeout` seconds (None: 30) for the replies being
        handled; from another thread than `run()`'s, also wait for `run()` to return."""
        self._stop_timeout = 30.0 if timeout is None else timeout
        with self._lock:
            self._stopping = True
            loop, requested = self._loop, self._stop_requested
        if loop is None or requested is None:
            return  # not running (or not yet: run() sees _stopping)
        loop.call_soon_threadsafe(requested.set)
        try:
            on_loop_thread = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop_thread = False
        if not on_loop_thread:
            self._done.wait(self._stop_timeout + 5.0)

    async def _main(self, concurrency: int, poll_interval: float, use_notify: bool) -> None:
        timeout_ms = self._statement_timeout

        async def configure(conn: AsyncConnection[Any]) -> None:
            await conn.set_autocommit(True)
            await conn.execute(f"SET statement_timeout = {int(timeout_ms)}")
            await conn.set_autocommit(False)

        given = self._pool.kwargs
        kwargs: dict[str, Any] = dict((given() if callable(given) else given) or {})
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self._pool.conninfo,
            kwargs={**keepalive_kwargs(pool_conninfo(self._pool)), **kwargs},
            min_size=1,
            max_size=concurrency + 1,
            configure=configure,
            open=False,
            name=f"rcmd-sync-router-{self._domain}",
        )
        await pool.open(wait=True)
        try:
            repo = self._process_repo
            if not inspect.iscoroutinefunction(getattr(repo, "get_by_id", None)):
                repo = PostgresProcessRepository(pool)
            router = ProcessReplyRouter(
                pool, repo, self._managers, self._reply_queue, self._domain,
                self._visibility_timeout, tsq_check_interval=self._tsq_check_interval,
                health=self._health,
            )  # fmt: skip
            requested = asyncio.Event()
            with self._lock:
                if self._stopping:
                    return
                self._loop = asyncio.get_running_loop()
                self._router = router
                self._stop_requested = requested
            _SYNC_MODE.set(True)  # the router's tasks (created from here on) run in sync mode
            task = asyncio.create_task(router.run(concurrency, poll_interval, use_notify))
            await asyncio.sleep(0)  # the router's run has started: its stop() now works
            stopper = asyncio.create_task(requested.wait())
            stuck = asyncio.create_task(self._watch_stuck(router))
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            stuck.cancel()
            if not task.done():
                await router.stop(self._stop_timeout)
            await task
        finally:
            await pool.close()

    async def _watch_stuck(self, router: ProcessReplyRouter) -> None:
        """Records each reply handled for longer than visibility_timeout + 5 s, once."""
        threshold = self._visibility_timeout + STUCK_THREAD_BUFFER_S
        seen: set[asyncio.Task[Any]] = set()
        while True:
            await asyncio.sleep(min(1.0, threshold / 4))
            now = time.monotonic()
            seen &= set(router.started)
            for task, started in list(router.started.items()):
                if task not in seen and now - started > threshold:
                    seen.add(task)
                    logger.error("sync process reply router on %s: a reply has been handled "
                                 "for %.1fs", self._reply_queue, now - started)  # fmt: skip
                    self._health.record_stuck_thread()


__all__ = ["SyncProcessReplyRouter"]
