"""Worker: runs handlers for one domain. The Rust engine claims commands (slots, backpressure,
waiting), keeps leases and applies outcomes in batched flushes; this module runs the handlers
and decides what each outcome is (the RetryPolicy chooses between retry and exhausted)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from psycopg_pool import AsyncConnectionPool

from commandbus import _db, _native
from commandbus._bridge import call
from commandbus._dsn import (
    DEFAULT_CALL_TIMEOUT,
    native_dsn,
    pool_conninfo,
    validate_call_timeout,
)
from commandbus._native import Outcome
from commandbus._observe import Observer, combine
from commandbus._sql import command_queue
from commandbus._validation import (
    INT32_MAX,
    decode_json,
    encode_json,
    text_problem,
    validate_domain,
    validate_int,
)
from commandbus.batch import run_callback_if_complete
from commandbus.exceptions import (
    BusinessRuleException,
    DatabaseError,
    HandlerNotFoundError,
    PermanentCommandError,
    SchemaNotInstalledError,
    SerializationError,
    TransientCommandError,
    ValidationError,
)
from commandbus.handler import HandlerRegistry
from commandbus.models import Command, CommandMetadata, CommandStatus, HandlerContext
from commandbus.policies import DEFAULT_RETRY_POLICY, RetryPolicy
from commandbus.retention import RetentionPolicy, run_partition_upkeep, run_retention

logger = logging.getLogger(__name__)

# Results and error details are stored in the command row: keep them bounded.
_MAX_RESULT_BYTES = 8 * 1_048_576
# Most handlers return None: one shared outcome instead of one object per command.
_SUCCESS = Outcome.success(None)

ClaimedTuple = tuple[int, int, int, Any, str, str, Any, str | None, Any, int]


@dataclass
class ReceivedCommand:
    """A command claimed from the queue, ready for processing (the step API)."""

    command: Command
    context: HandlerContext
    msg_id: int
    metadata: CommandMetadata


class _LeaseExtender:
    """HandlerContext.extend_visibility: pushes this lease's visibility forward, fenced."""

    __slots__ = ("_attempt", "_msg_id", "_native")

    def __init__(self, native: _native.NativeWorker, msg_id: int, attempt: int) -> None:
        self._native = native
        self._msg_id = msg_id
        self._attempt = attempt

    async def extend(self, seconds: int) -> None:
        native, msg_id, attempt = self._native, self._msg_id, self._attempt
        if not await call(lambda c: native.extend(c, msg_id, attempt, int(seconds))):
            logger.warning(
                "lease of msg %s (attempt %s) is no longer held: visibility not extended",
                self._msg_id,
                self._attempt,
            )


def _storable(text: str) -> str:
    """An error text as PostgreSQL can store it: a NUL character or a lone surrogate (which
    a handler's message may hold) would fail the whole flush, so they are written escaped."""
    if text_problem(text) is None:
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _details_json(details: dict[str, Any]) -> str | None:
    if not details:
        return None
    try:
        encoded = orjson.dumps(details, default=repr)
    except (TypeError, orjson.JSONEncodeError):
        encoded = orjson.dumps({"repr": repr(details)})
    # JSONB rejects an escaped NUL: error details are diagnostics, a replacement will do.
    return encoded.replace(b"\\u0000", b"\\ufffd").decode()


def _observe_started(
    observer: Observer, command: Command, context: HandlerContext, item: Any
) -> Any:
    try:
        return observer.started(command, context, item)
    except Exception:
        logger.exception("observer %r failed", observer)
        return None


def _observe_finished(observer: Observer, token: Any, kind: str) -> None:
    try:
        observer.finished(token, kind)
    except Exception:
        logger.exception("observer %r failed", observer)


class Worker:
    """Receives and processes the commands of one domain.

    Example:
        worker = Worker(pool, domain="orders", registry=registry)
        await worker.run(concurrency=64)
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        domain: str,
        registry: HandlerRegistry | None = None,
        visibility_timeout: int = 30,
        retry_policy: RetryPolicy | None = None,
        *,
        auto_extend_leases: bool = False,
        max_flush: int = 1000,
        sync_handler_threads: int | None = None,
        retention: RetentionPolicy | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        """Args:
        pool: the psycopg async pool (its conninfo is what the Rust engine connects with).
        domain: the domain whose queue `{domain}__commands` this worker drains.
        registry: handlers; required by `run()`, not by the step API.
        visibility_timeout: seconds a claimed command stays invisible (its lease).
        retry_policy: backoff schedule, and max_attempts for commands sent without one.
        auto_extend_leases: keep extending the leases of running handlers (long handlers).
        max_flush: most outcomes applied per flush.
        sync_handler_threads: size of the thread pool for plain `def` handlers
            (default: min(concurrency, 32)).
        retention: prune this domain's old terminal commands periodically while running.
        call_timeout: deadline in seconds of one database call of the engine (claim, flush,
            lease extension, release; plus 1 ms per row it carries). A call with no answer
            by then abandons its connection and is retried on a fresh one, with the backoff
            of any connection error. The server cancels an engine statement after three times
            this (`statement_timeout`). The library's own calls on `pool` (retention,
            partition upkeep, the step API's queue check) get three times this as their
            deadline.
        """
        self._pool = pool
        self._domain = validate_domain(domain)
        self._registry = registry
        validate_int("visibility_timeout", visibility_timeout, 1, INT32_MAX)
        self._visibility_timeout = visibility_timeout
        self._retry_policy = retry_policy or DEFAULT_RETRY_POLICY
        self._auto_extend = auto_extend_leases
        self._max_flush = max_flush
        self._sync_threads = sync_handler_threads
        self._retention = retention
        self._call_timeout = validate_call_timeout(call_timeout)
        if isinstance(pool, AsyncConnectionPool):  # (a SyncWorker's twin pool included)
            _db.set_pool_deadline(pool, 3 * self._call_timeout)
        self._queue_name = command_queue(domain)
        self._dsn = native_dsn(pool_conninfo(pool))
        self._running = False
        self._stop_requested = False
        self._stop_timeout: float | None = None
        self._stop_cancel = False
        self._signal_stop_timeout = 30.0
        self._stopped = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._native: _native.NativeWorker | None = None
        self._step_native: _native.NativeWorker | None = None
        self._step_queue_ready = False
        self._executor: ThreadPoolExecutor | None = None
        # Metrics, tracing and health attach here (commandbus.metrics / tracing / health); with
        # none attached the run loop is the plain one: nothing per command is added.
        self._observers: list[Observer] = []

    def add_observer(self, observer: Observer) -> None:
        """Attach an observer of handler runs (see `commandbus._observe`); takes effect at the
        next `run()`. `commandbus.metrics.instrument`, `tracing.instrument` and `health` use it."""
        if observer not in self._observers:
            self._observers.append(observer)

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def queue_name(self) -> str:
        return self._queue_name

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def in_flight_count(self) -> int:
        return len(self._in_flight)

    def stats(self) -> dict[str, int | str | None]:
        """Counters of the engine of the current (or last) run: claimed, applied, fenced..."""
        return self._native.stats() if self._native is not None else {}

    def _new_native(
        self, use_notify: bool, poll_interval: float, concurrency: int = 1
    ) -> _native.NativeWorker:
        return _native.NativeWorker(
            self._dsn,
            self._domain,
            visibility_timeout=self._visibility_timeout,
            default_max_attempts=self._retry_policy.max_attempts,
            use_notify=use_notify,
            poll_interval=poll_interval,
            max_flush=self._max_flush,
            auto_extend=self._auto_extend,
            concurrency=concurrency,
            call_timeout=self._call_timeout,
            # What `pg_stat_activity` shows for this worker's connections (the console's
            # "workers seen"); the pid of the process running it, after any fork.
            application_name=f"rcmd worker {self._domain} {socket.gethostname()}:{os.getpid()}",
        )

    # -- decoding ------------------------------------------------------------------------

    def _decode(
        self, native: _native.NativeWorker, item: ClaimedTuple
    ) -> tuple[Command, HandlerContext]:
        """The handler's arguments from one claimed row (the run loop's per-command work)."""
        (msg_id, attempt, max_attempts, command_id, command_type, data_json, correlation_id,
         reply_to, _batch_id, created_us) = item  # fmt: skip
        created_at = datetime.fromtimestamp(created_us / 1_000_000, UTC)
        data = decode_json(data_json)
        command = Command(
            domain=self._domain,
            command_type=command_type,
            command_id=command_id,
            data=data if isinstance(data, dict) else {"value": data},
            correlation_id=correlation_id,
            reply_to=reply_to,
            created_at=created_at,
        )
        context = HandlerContext(
            command=command,
            attempt=attempt,
            max_attempts=max_attempts,
            msg_id=msg_id,
            visibility_extender=_LeaseExtender(native, msg_id, attempt),
        )
        return command, context

    def _received(self, native: _native.NativeWorker, item: ClaimedTuple) -> ReceivedCommand:
        """A claimed row for the step API, with its metadata."""
        command, context = self._decode(native, item)
        msg_id, attempt, max_attempts, command_id, command_type = item[:5]
        correlation_id, reply_to, batch_id = item[6:9]
        metadata = CommandMetadata(
            domain=self._domain,
            command_id=command_id,
            command_type=command_type,
            status=CommandStatus.IN_PROGRESS,
            attempts=attempt,
            max_attempts=max_attempts,
            msg_id=msg_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            created_at=command.created_at,
            updated_at=datetime.now(UTC),
            batch_id=batch_id,
        )
        return ReceivedCommand(command=command, context=context, msg_id=msg_id, metadata=metadata)

    def _failure(
        self, error: BaseException, attempt: int, max_attempts: int, *, permanent: bool = False
    ) -> Outcome:
        """The outcome of a handler error. A transient failure is retried after the retry
        policy's backoff, or exhausted once `max_attempts` (the command's own, else the
        policy's) are used up; `permanent` sends any error to the TSQ at once."""
        if isinstance(error, BusinessRuleException | PermanentCommandError | TransientCommandError):
            code, message, details = error.code, error.error_message, _details_json(error.details)
        else:
            code, message, details = type(error).__name__, str(error), None
        code, message = _storable(str(code)), _storable(str(message))
        if isinstance(error, BusinessRuleException):
            error_type = "BUSINESS_RULE"
        elif isinstance(error, PermanentCommandError):
            error_type = "PERMANENT"
        else:
            error_type = "TRANSIENT"
        if permanent or error_type == "PERMANENT":
            return Outcome.permanent(code, message, details, error_type)
        if error_type == "BUSINESS_RULE":
            return Outcome.business_rule(code, message, details)
        backoff = self._retry_policy.retry_after(attempt, max_attempts)
        if backoff is None:
            return Outcome.exhausted(code, message, details)
        return Outcome.retry(code, message, details, backoff)

    def _stopped_outcome(self, attempt: int, max_attempts: int) -> Outcome:
        """A handler cut off at stop: the attempt was made (side effects may be half done), so
        it counts like a transient failure, and the retry policy decides as for any other; a
        retry is due at once (the command did nothing wrong)."""
        code, message = "WORKER_STOPPED", "handler cancelled when its worker stopped"
        if self._retry_policy.retry_after(attempt, max_attempts) is None:
            return Outcome.exhausted(code, message, None)
        return Outcome.retry(code, message, None, 0)

    # -- the run loop --------------------------------------------------------------------

    async def _call_handler(self, cmd: Command, ctx: HandlerContext) -> Any:
        assert self._registry is not None
        resolved = self._registry.resolve(cmd.domain, cmd.command_type)
        if resolved is None:
            raise HandlerNotFoundError(cmd.domain, cmd.command_type)
        if resolved.is_async:
            return await resolved.fn(cmd, ctx)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._sync_threads or 8, thread_name_prefix=f"rcmd-{self._domain}"
            )
        loop = asyncio.get_running_loop()
        # In the caller's context, as asyncio.to_thread: a span (commandbus.tracing) or any
        # context variable set around the handler is seen by its thread too.
        run = contextvars.copy_context().run
        result = await loop.run_in_executor(self._executor, run, resolved.fn, cmd, ctx)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _execute(
        self, native: _native.NativeWorker, item: ClaimedTuple, observer: Observer | None = None
    ) -> None:
        """Runs one claimed command's handler and reports its outcome. `observer` (several are
        combined into one, `_observe.combine`), when given, is told of the handler's start and
        of its outcome kind (SUCCESS, RETRY, EXHAUSTED, PERMANENT or BUSINESS_RULE); its
        failure is logged and never changes the outcome."""
        msg_id, attempt, max_attempts = item[0], item[1], item[2]
        token: Any = None
        outcome = _SUCCESS
        try:
            command, context = self._decode(native, item)
            if observer is not None:
                token = _observe_started(observer, command, context, item)
            result = await self._call_handler(command, context)
            if result is not None:
                try:
                    result_json = encode_json(result, "result", _MAX_RESULT_BYTES)
                except (SerializationError, ValidationError) as exc:
                    raise PermanentCommandError("RESULT_NOT_SERIALIZABLE", str(exc)) from exc
                outcome = Outcome.success(result_json)
        except asyncio.CancelledError:
            outcome = self._stopped_outcome(attempt, max_attempts)
            raise
        except (TransientCommandError, PermanentCommandError, BusinessRuleException) as exc:
            logger.info("command msg_id=%s attempt=%s failed: %s", msg_id, attempt, exc)
            outcome = self._failure(exc, attempt, max_attempts)
        except Exception as exc:
            logger.exception("handler of msg_id=%s attempt=%s raised", msg_id, attempt)
            outcome = self._failure(exc, attempt, max_attempts)
        finally:
            native.report(msg_id, attempt, outcome)
            if observer is not None:
                _observe_finished(observer, token, outcome.kind)

    async def run(
        self,
        concurrency: int = 1,
        poll_interval: float = 1.0,
        use_notify: bool = True,
        *,
        handle_signals: bool = False,
        signal_stop_timeout: float = 30.0,
    ) -> None:
        """Process commands until `stop()` (or SIGTERM/SIGINT with `handle_signals=True`: the
        first signal stops gracefully, waiting up to `signal_stop_timeout` seconds for running
        handlers; a second one cancels them at once).

        Up to `concurrency` handlers run at once: async handlers as asyncio tasks, plain
        `def` handlers in a bounded thread pool. NOTIFY wakes the worker when commands arrive;
        it also polls every `poll_interval` seconds.
        """
        if self._registry is None:
            raise RuntimeError("Cannot run worker without a handler registry")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValidationError("concurrency", concurrency, "must be an integer >= 1")
        if not isinstance(poll_interval, int | float) or poll_interval <= 0:
            raise ValidationError("poll_interval", poll_interval, "must be a number > 0 (seconds)")
        if self._running:
            raise RuntimeError(f"worker for {self._domain} is already running")
        if self._sync_threads is None:
            self._sync_threads = min(concurrency, 32)
        self._signal_stop_timeout = signal_stop_timeout
        native = self._new_native(use_notify, float(poll_interval), concurrency)
        self._native = native
        self._running = True
        self._stop_requested = False
        self._stopped.clear()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal)
        logger.info("worker for %s starting (concurrency=%d)", self._domain, concurrency)
        retention_stop = asyncio.Event()
        retention_task: asyncio.Task[None] | None = None
        upkeep_task: asyncio.Task[None] | None = None
        events_task: asyncio.Task[None] | None = None
        try:
            await call(native.start)
            events_task = asyncio.create_task(
                self._log_events(native), name=f"rcmd-events-{self._domain}"
            )
            if not self._pool.closed:  # (SyncWorker's internal pool opens for retention only)
                upkeep_task = asyncio.create_task(
                    run_partition_upkeep(self._pool, retention_stop),
                    name=f"rcmd-partitions-{self._domain}",
                )
            if self._retention is not None:
                retention_task = asyncio.create_task(
                    run_retention(
                        self._pool, self._retention.for_domain(self._domain), retention_stop
                    ),
                    name=f"rcmd-retention-{self._domain}",
                )
            # The engine claims when slots are free (a slot frees when its outcome is
            # reported) and hands each claimed batch over here; empty means stopping.
            in_flight = self._in_flight
            observers = tuple(self._observers)
            for obs in observers:
                obs.attach(self, native)
            # Metrics count in the engine; only observers with per-command hooks (tracing,
            # health) are called around each handler run.
            observer = combine([o for o in observers if getattr(o, "per_command", True)])
            while not self._stop_requested:
                try:
                    batch: list[ClaimedTuple] = await call(native.next_batch)
                except SchemaNotInstalledError:
                    raise
                except DatabaseError as exc:
                    # The database went away for a moment (restart, failover, network): the
                    # engine retries with backoff; sqlx reconnects underneath.
                    logger.warning("worker for %s: claim failed (%s), retrying", self._domain, exc)
                    continue
                if not batch:
                    break
                if observer is not None:
                    try:
                        await observer.claimed(batch)
                    except Exception:
                        logger.exception("observer %r failed", observer)
                for item in batch:
                    task = asyncio.create_task(self._execute(native, item, observer))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            retention_stop.set()
            if retention_task is not None:
                await retention_task  # logs and swallows prune errors itself
            if upkeep_task is not None:
                await upkeep_task  # logs and swallows its errors itself
            await self._shutdown(native, events_task)

    async def _log_events(self, native: _native.NativeWorker) -> None:
        """Logs the engine's background failures as they happen, until it shuts down."""
        while (event := await call(native.next_event)) is not None:
            kind, message, count = event
            times = f" ({count} times)" if count > 1 else ""
            if kind == "flush":
                logger.error(
                    "worker for %s: outcome flush failed%s, retrying: %s",
                    self._domain, times, message,
                )  # fmt: skip
            else:
                logger.warning(
                    "worker for %s: lease extension failed%s: %s", self._domain, times, message
                )

    def _on_signal(self) -> None:
        if self._stop_requested:
            logger.warning(
                "worker for %s: second signal, cancelling running handlers", self._domain
            )
            for task in list(self._in_flight):
                task.cancel()
            return
        logger.info("worker for %s: signal received, stopping", self._domain)
        self._stop_timeout = self._signal_stop_timeout
        self._request_stop()

    def _request_stop(self) -> None:
        self._stop_requested = True
        if self._native is not None:
            self._native.stop_claiming()

    async def _shutdown(
        self, native: _native.NativeWorker, events_task: asyncio.Task[None] | None
    ) -> None:
        """The stop sequence: stop claiming; let in-flight handlers finish (up to the stop
        timeout), cancel the rest; flush every outcome; release unreported leases (batches
        claimed and never started included); close. With a stop timeout all of it ends within
        that timeout, even when the database does not answer: handlers get the timeout but its
        last tenth (at most 1 s), the engine's part what is left (what it cannot flush or
        release in time is redelivered once its lease expires, never applied twice)."""
        native.stop_claiming()
        timeout = self._stop_timeout
        until = None if timeout is None else time.monotonic() + max(0.0, timeout)
        try:
            if self._in_flight:
                handlers_timeout = (
                    0.0
                    if self._stop_cancel
                    else None
                    if timeout is None
                    else timeout - min(1.0, timeout / 10)
                )
                _done, pending = await asyncio.wait(set(self._in_flight), timeout=handlers_timeout)
                for task in pending:
                    task.cancel()
                if pending:
                    logger.warning(
                        "worker for %s: %d handlers cancelled at stop", self._domain, len(pending)
                    )
                    await asyncio.wait(pending)
            budget = None if until is None else max(0.0, until - time.monotonic())
            shutdown = call(lambda completions: native.shutdown(completions, budget))
            released = 0
            try:
                # The engine keeps to the budget itself; the wait_for only guards against a
                # bug there.
                released = await asyncio.wait_for(shutdown, None if budget is None else budget + 1)
            except (DatabaseError, TimeoutError) as exc:
                # The database is away: nothing is lost, the leases expire.
                logger.warning(
                    "worker for %s: unfinished commands not released at stop (%s); they come "
                    "back when their leases expire", self._domain, exc or "no answer",
                )  # fmt: skip
            for obs in self._observers:
                try:
                    await obs.detach(self, native)
                except Exception:
                    logger.exception("observer %r failed at stop", obs)
            if released:
                logger.info("worker for %s released %d unfinished commands", self._domain, released)
            unflushed = native.stats()["unflushed"]
            if unflushed:
                logger.warning(
                    "worker for %s: %s outcomes not applied at stop (the database did not "
                    "answer in time); their commands are redelivered when their leases expire",
                    self._domain, unflushed,
                )  # fmt: skip
            if events_task is not None:
                # ends once the engine is shut down, after the last event
                await asyncio.wait([events_task], timeout=1.0)
        finally:
            if events_task is not None and not events_task.done():
                events_task.cancel()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
            self._running = False
            self._stopped.set()
            logger.info("worker for %s stopped", self._domain)

    async def stop(self, timeout: float | None = None, *, cancel_handlers: bool = False) -> None:
        """Stop gracefully: claim nothing more, wait for running handlers, apply their outcomes
        and release what never started. Returns once the worker has stopped, within `timeout`
        seconds (None: no limit) even when the database does not answer: handlers get the
        timeout but its last tenth (at most 1 s); what cannot be flushed or released in time
        is redelivered when its lease expires (never applied twice).

        `cancel_handlers=True` cancels running handlers at once (their attempt counts: retried
        at once, `WORKER_STOPPED`) and leaves all of `timeout` to applying outcomes."""
        if not self._running:
            return
        self._stop_timeout = timeout
        self._stop_cancel = cancel_handlers
        self._request_stop()
        await self._stopped.wait()

    # -- step API (callers that drive the worker by hand) ---------------------------------

    def _step(self) -> _native.NativeWorker:
        if self._step_native is None:
            self._step_native = self._new_native(False, 1.0)
        return self._step_native

    async def receive(
        self, batch_size: int = 1, visibility_timeout: int | None = None
    ) -> list[ReceivedCommand]:
        """Claim up to `batch_size` commands now (no waiting)."""
        validate_int("batch_size", batch_size, 1, INT32_MAX)
        if visibility_timeout is not None:
            validate_int("visibility_timeout", visibility_timeout, 1, INT32_MAX)
        if not self._step_queue_ready:
            # As run() does at start: a domain nothing was sent to yet has no queue.
            await _db.fetch_value(self._pool, "ensure_queue", self._queue_name)
            self._step_queue_ready = True
        native = self._step()
        vt = visibility_timeout or self._visibility_timeout
        items = await call(lambda c: native.receive(c, batch_size, vt))
        return [self._received(native, item) for item in items]

    async def _finish(self, received: ReceivedCommand, outcome: Outcome) -> bool:
        native, msg_id, attempt = self._step(), received.msg_id, received.context.attempt
        applied: bool = await call(lambda c: native.finish_now(c, msg_id, attempt, outcome))
        if not applied:
            logger.warning(
                "outcome for command %s ignored: its lease (msg %s, attempt %s) is no longer held",
                received.command.command_id,
                received.msg_id,
                received.context.attempt,
            )
        elif (batch_id := received.metadata.batch_id) is not None:
            # As the predecessor's step API: a batch this outcome completed runs the callback
            # this process registered before the call returns (once: see batch.py).
            await run_callback_if_complete(self._pool, self._domain, batch_id)
        return applied

    def _step_failure(
        self, received: ReceivedCommand, error: BaseException, *, permanent: bool = False
    ) -> Outcome:
        ctx = received.context
        return self._failure(error, ctx.attempt, ctx.max_attempts, permanent=permanent)

    async def complete(
        self, received: ReceivedCommand, result: dict[str, Any] | None = None
    ) -> None:
        """Mark the command COMPLETED (result stored, SUCCESS reply where `reply_to` is set)."""
        result_json = None if result is None else encode_json(result, "result", _MAX_RESULT_BYTES)
        await self._finish(received, Outcome.success(result_json))

    async def fail(
        self, received: ReceivedCommand, error: Exception, is_transient: bool = True
    ) -> None:
        """Record a failure: retry after the backoff, or the TSQ once attempts are used up.
        With `is_transient=False` the command goes to the TSQ at once."""
        await self._finish(
            received, self._step_failure(received, error, permanent=not is_transient)
        )

    async def fail_permanent(self, received: ReceivedCommand, error: PermanentCommandError) -> None:
        """Move the command to the troubleshooting queue."""
        await self._finish(received, self._step_failure(received, error))

    async def fail_business_rule(
        self, received: ReceivedCommand, error: BusinessRuleException
    ) -> None:
        """Mark the command FAILED (FAILED reply where `reply_to` is set)."""
        await self._finish(received, self._step_failure(received, error))

    async def close(self, timeout: float | None = 30.0) -> None:
        """Release the step API's unfinished leases and close its connections, within
        `timeout` seconds (None: no limit) even when the database does not answer: leases not
        released in time come back when they expire."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise ValidationError("timeout", timeout, "must be a number of seconds >= 0 or None")
        native, self._step_native = self._step_native, None
        if native is None:
            return
        shutdown = call(lambda completions: native.shutdown(completions, timeout))
        try:
            # The engine keeps to the budget itself; the wait_for only guards against a bug.
            await asyncio.wait_for(shutdown, None if timeout is None else timeout + 1)
        except (DatabaseError, TimeoutError) as exc:
            logger.warning(
                "worker for %s: step API leases not released at close (%s); they come back "
                "when they expire", self._domain, exc or "no answer",
            )  # fmt: skip


__all__ = ["ReceivedCommand", "Worker"]
