"""SyncWorker: the async `Worker` (and its Rust engine) run for code without asyncio.

`run()` blocks the calling thread and runs a private asyncio loop in it (`asyncio.run`) that
drives an async `Worker`: the engine claims, keeps leases and flushes outcomes exactly as for
the async worker, and the plain `def` handlers run in a bounded thread pool. While handlers
run, the loop thread waits in its selector (the GIL released) for the engine's next batch and
the handlers' results. `stop(timeout)` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from psycopg import errors as pg_errors
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from commandbus._dsn import DEFAULT_CALL_TIMEOUT, parse_conninfo
from commandbus._observe import Observer
from commandbus.exceptions import TransientCommandError, ValidationError
from commandbus.handler import HandlerRegistry
from commandbus.models import Command, HandlerContext
from commandbus.policies import RetryPolicy
from commandbus.retention import RetentionPolicy
from commandbus.sync._pool import async_twin, sync_pool_settings
from commandbus.sync.health import HealthStatus
from commandbus.sync.timeouts import (
    DEFAULT_STATEMENT_TIMEOUT_MS,
    STUCK_THREAD_BUFFER_S,
    validate_timeouts,
)
from commandbus.worker import Worker

logger = logging.getLogger(__name__)

#: The predecessor's run() default.
DEFAULT_CONCURRENCY = 4


def _with_statement_timeout(conninfo: str, statement_timeout_ms: int) -> str:
    """The conninfo with `-c statement_timeout=N` added to its `options`."""
    params = parse_conninfo(conninfo)
    options = str(params.get("options") or "")
    params["options"] = f"{options} -c statement_timeout={int(statement_timeout_ms)}".strip()
    return make_conninfo("", **params)


class _EngineWorker(Worker):
    """The async Worker, with the sync worker's health accounting around each handler: a
    success or failure is recorded in the `HealthStatus`; psycopg's `QueryCanceled` and
    psycopg_pool's `PoolTimeout` raised by a handler become transient failures coded
    `STATEMENT_TIMEOUT` / `POOL_TIMEOUT` (the latter also counted as a pool exhaustion), as
    in the predecessor. Start times of running handlers are kept for the stuck check."""

    def __init__(self, *args: Any, health: HealthStatus, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.health = health
        self.started: dict[asyncio.Task[Any], float] = {}

    async def _call_handler(self, cmd: Command, ctx: HandlerContext) -> Any:
        task = asyncio.current_task()
        if task is not None:
            self.started[task] = time.monotonic()
        try:
            result = await super()._call_handler(cmd, ctx)
        except pg_errors.QueryCanceled as exc:
            self.health.record_failure(exc)
            raise TransientCommandError(
                "STATEMENT_TIMEOUT", "PostgreSQL statement timeout exceeded"
            ) from exc
        except PoolTimeout as exc:
            self.health.record_pool_exhaustion()
            self.health.record_failure(exc)
            raise TransientCommandError("POOL_TIMEOUT", "Connection pool exhausted") from exc
        except Exception as exc:
            self.health.record_failure(exc)
            raise
        finally:
            if task is not None:
                self.started.pop(task, None)
        self.health.record_success()
        return result


class SyncWorker:
    """Receives and processes the commands of one domain with plain `def` handlers, blocking.

    Example:
        worker = SyncWorker(pool, domain="payments", registry=registry)
        worker.run(concurrency=4)  # blocks until stop() (from another thread) or SIGTERM

    Differences from the predecessor's SyncWorker (same constructor and `run()` arguments):
      * claims, lease keeping and outcome flushes are made by the Rust engine on its own
        connections (at most a few), not on `pool`; `statement_timeout` applies to those
        connections (`options=-c statement_timeout=N`), not to the handlers' ones. `pool` is
        used for its settings (and by your handlers); with `retention=`, an internal async pool
        on the same settings does the pruning.
      * `stop(timeout)` means what the async worker's does: `None` waits for running handlers
        without limit; handlers still running after `timeout` are reported as a transient
        `WORKER_STOPPED` failure (their threads cannot be killed and finish on their own), and
        commands claimed but never started are released at once instead of waiting for their
        visibility timeout.
      * `health_status` records each handler's success or failure, `PoolTimeout`s raised by
        handlers, and each handler running longer than visibility_timeout + 5 s once (the
        predecessor counted a stuck handler again at every poll). Claim and flush failures are
        retried by the engine and logged, not counted.
      * `concurrency` may also be given to the constructor (as the predecessor's README did),
        as the default of `run()`.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        domain: str,
        registry: HandlerRegistry | None = None,
        *,
        visibility_timeout: int = 30,
        retry_policy: RetryPolicy | None = None,
        statement_timeout: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        concurrency: int | None = None,
        handler_threads: int | None = None,
        auto_extend_leases: bool = False,
        max_flush: int = 1000,
        retention: RetentionPolicy | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        """Args:
        pool: a `psycopg_pool.ConnectionPool` (its conninfo and connection kwargs are what the
            engine connects with).
        domain: the domain whose queue `{domain}__commands` this worker drains.
        registry: handlers; required by `run()`.
        visibility_timeout: seconds a claimed command stays invisible (its lease).
        retry_policy: backoff schedule, and max_attempts for commands sent without one.
        statement_timeout: PostgreSQL statement timeout (ms) of the engine's connections; must
            be shorter than the visibility timeout (ValueError otherwise).
        concurrency: default of `run(concurrency=...)` (4 when neither gives it).
        handler_threads: threads running handlers (default: min(concurrency, 32), as the async
            worker's; raise it for handlers that mostly wait on I/O).
        auto_extend_leases, max_flush, retention, call_timeout: as for the async `Worker`.
        """
        validate_timeouts(statement_timeout, visibility_timeout)
        if concurrency is not None:
            _check_positive("concurrency", concurrency)
        if handler_threads is not None:
            _check_positive("handler_threads", handler_threads)
        conninfo, kwargs = sync_pool_settings(pool)
        self._pool = pool
        self._conninfo = _with_statement_timeout(conninfo, statement_timeout)
        self._kwargs = kwargs
        self._domain = domain
        self._registry = registry
        self._visibility_timeout = visibility_timeout
        self._retry_policy = retry_policy
        self._statement_timeout = statement_timeout
        self._concurrency = concurrency
        self._handler_threads = handler_threads
        self._auto_extend = auto_extend_leases
        self._max_flush = max_flush
        self._retention = retention
        self._call_timeout = call_timeout
        self._health = HealthStatus()
        self._lock = threading.Lock()
        self._running = False
        self._stop_requested = False
        self._done = threading.Event()
        self._done.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: _EngineWorker | None = None
        self._last: _EngineWorker | None = None
        self._run_thread: threading.Thread | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._observers: list[Observer] = []
        # Validates the domain and the other arguments now, as the async Worker does.
        self._queue_name = self._new_worker(async_twin(self._conninfo, {}, 1, "x")).queue_name

    def _new_worker(self, apool: AsyncConnectionPool[Any]) -> _EngineWorker:
        return _EngineWorker(
            apool,
            self._domain,
            self._registry,
            self._visibility_timeout,
            self._retry_policy,
            auto_extend_leases=self._auto_extend,
            max_flush=self._max_flush,
            sync_handler_threads=self._handler_threads,
            retention=self._retention,
            call_timeout=self._call_timeout,
            health=self._health,
        )

    def add_observer(self, observer: Observer) -> None:
        """Attach an observer of handler runs (metrics, tracing), as `Worker.add_observer`;
        takes effect at the next `run()`."""
        if observer not in self._observers:
            self._observers.append(observer)

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def queue_name(self) -> str:
        return self._queue_name

    @property
    def health_status(self) -> HealthStatus:
        """Handler successes and failures, pool exhaustions and stuck handlers."""
        return self._health

    @property
    def is_running(self) -> bool:
        """True from `run()` until it returns, unless a stop was requested."""
        return self._running and not self._stop_requested

    @property
    def in_flight_count(self) -> int:
        """Handlers running now."""
        worker = self._worker
        return worker.in_flight_count if worker is not None else 0

    def stats(self) -> dict[str, int | str | None]:
        """Counters of the engine of the current (or last) run: claimed, applied, fenced..."""
        worker = self._worker or self._last
        return worker.stats() if worker is not None else {}

    def run(
        self,
        concurrency: int | None = None,
        poll_interval: float = 1.0,
        use_notify: bool = True,
        *,
        handle_signals: bool = False,
        signal_stop_timeout: float = 30.0,
    ) -> None:
        """Process commands until `stop()` (from another thread, a handler or a watchdog), or
        SIGTERM/SIGINT with `handle_signals=True` (main thread only: the first signal stops
        gracefully, waiting up to `signal_stop_timeout` seconds for running handlers; a second
        one stops waiting for them). Blocks the calling thread.

        Up to `concurrency` handlers are claimed at once and run in a thread pool of
        `handler_threads` threads (default `min(concurrency, 32)`: more threads only take turns
        at the GIL). NOTIFY wakes the worker when commands arrive; it also polls every
        `poll_interval` seconds (`use_notify=False`: polling only).
        """
        if self._registry is None:
            raise RuntimeError("Cannot run worker without a handler registry")
        if concurrency is None:
            concurrency = self._concurrency or DEFAULT_CONCURRENCY
        _check_positive("concurrency", concurrency)
        if handle_signals and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("run(handle_signals=True) must be called from the main thread")
        with self._lock:
            if self._running:
                raise RuntimeError(f"sync worker for {self._domain} is already running")
            self._running = True
            self._stop_requested = False
            self._run_thread = threading.current_thread()
            self._done.clear()
        try:
            asyncio.run(
                self._main(
                    concurrency, poll_interval, use_notify, handle_signals, signal_stop_timeout
                )
            )
        finally:
            with self._lock:
                self._running = False
                self._loop = None
                self._worker = None
                self._run_thread = None
                self._done.set()

    async def _main(
        self,
        concurrency: int,
        poll_interval: float,
        use_notify: bool,
        handle_signals: bool,
        signal_stop_timeout: float,
    ) -> None:
        apool = async_twin(self._conninfo, self._kwargs, 2, f"rcmd-sync-{self._domain}")
        worker = self._new_worker(apool)
        for observer in self._observers:
            worker.add_observer(observer)
        if worker._sync_threads is None:
            # As the async worker: more threads than this only take turns at the GIL.
            worker._sync_threads = min(concurrency, 32)
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._worker = self._last = worker
        stuck = asyncio.create_task(self._watch_stuck(worker))
        try:
            if self._retention is not None:
                await apool.open()
            # A stop() that came before the worker started: nothing to run. (Once
            # `worker.run` is entered it is running before any other callback can run.)
            if self._stop_requested:
                return
            await worker.run(
                concurrency,
                poll_interval,
                use_notify,
                handle_signals=handle_signals,
                signal_stop_timeout=signal_stop_timeout,
            )
        finally:
            stuck.cancel()
            if self._stop_task is not None:
                await asyncio.gather(self._stop_task, return_exceptions=True)
                self._stop_task = None
            await apool.close()

    async def _watch_stuck(self, worker: _EngineWorker) -> None:
        """Records each handler running longer than visibility_timeout + 5 s, once."""
        threshold = self._visibility_timeout + STUCK_THREAD_BUFFER_S
        seen: set[asyncio.Task[Any]] = set()
        while True:
            await asyncio.sleep(min(1.0, threshold / 4))
            now = time.monotonic()
            seen &= set(worker.started)
            for task, started in list(worker.started.items()):
                if task not in seen and now - started > threshold:
                    seen.add(task)
                    logger.error(
                        "sync worker for %s: a handler has been running for %.1fs",
                        self._domain,
                        now - started,
                    )
                    self._health.record_stuck_thread()

    def _begin_stop(self, worker: _EngineWorker, timeout: float | None) -> None:
        # On the run's loop. A worker not running yet sees `_stop_requested` before it starts.
        if worker.is_running and self._stop_task is None:
            self._stop_task = asyncio.ensure_future(worker.stop(timeout))

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: claim nothing more, wait up to `timeout` seconds (None: no limit)
        for running handlers, apply their outcomes and release what never started; return
        once `run()` has returned. From a handler (or the run's own thread) it only requests
        the stop. Does nothing when the worker is not running."""
        with self._lock:
            if not self._running:
                return
            self._stop_requested = True
            loop, worker = self._loop, self._worker
            run_thread = self._run_thread
        logger.info("stopping sync worker for %s", self._domain)
        if loop is not None and worker is not None:
            # RuntimeError: the loop already closed, run() is returning
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._begin_stop, worker, timeout)
        current = threading.current_thread()
        if current is run_thread or current.name.startswith(f"rcmd-{self._domain}_"):
            return
        self._done.wait()


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(name, value, "must be an integer >= 1")


__all__ = ["SyncWorker"]
