"""Batch completion callbacks: the registry of ``reliable-cmd`` and the listener that fires them.

A callback (``on_complete`` of ``CommandBus.create_batch``) runs exactly once per batch, in the
process that registered it, whichever process finished the batch's last command: the database
announces every completion (``apply_batch_delta_v1`` does ``NOTIFY commandbus_batch
'<domain>:<batch_id>'``) and one listener per database and event loop hears it.

Exactly once: every path that may fire a callback (a notification, the check after LISTEN and
after each reconnect, the slow poll, the check at registration, the predecessor's explicit
``invoke_batch_callback``) first pops the callback from the registry under one lock; only the
path that popped it runs it. A completion announced while nobody listened (before LISTEN, during
a reconnect, before the callback was registered) is found by the checks, so none is missed.

Callbacks are in-memory: a process that exits (or a bus that is closed) with callbacks pending
drops them; poll ``get_batch()`` where the outcome must survive restarts.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus._dsn import keepalive_kwargs, pool_conninfo
from commandbus.exceptions import (
    CommandBusError,
    DuplicateBatchError,  # re-exported: its old home
)
from commandbus.models import BatchMetadata, BatchStatus

logger = logging.getLogger(__name__)

#: Accepted ``batch_type`` values.
BATCH_TYPES = ("COMMAND", "PROCESS")
#: The NOTIFY channel of batch completions (payload ``<domain>:<batch_id>``).
BATCH_CHANNEL = "commandbus_batch"
#: ``application_name`` of the listener's connection (visible in ``pg_stat_activity``).
LISTENER_APPLICATION_NAME = "commandbus-batch-listener"
#: Seconds between the listener's checks of every pending batch (missed notifications).
LISTENER_POLL_INTERVAL = 5.0
#: First and largest pause before the listener reconnects (doubling in between).
LISTENER_RECONNECT_DELAY = (0.5, 30.0)
#: deadline in seconds of each database call of the listener (connect, LISTEN, the check of
#: pending batches): a connection that goes silent is dropped and replaced, never waited on
LISTENER_CALL_TIMEOUT = 10.0
#: A pending callback whose batch does not exist this many seconds after registration (its
#: creating transaction rolled back) is dropped.
ORPHAN_GRACE = 600.0

_TERMINAL = (BatchStatus.COMPLETED, BatchStatus.COMPLETED_WITH_FAILURES)

#: Called with the final BatchMetadata: an ``async def`` is awaited, a plain function runs in a
#: worker thread (``asyncio.to_thread``). The predecessor accepted async functions only.
BatchCompletionCallback = Callable[[BatchMetadata], Any]
#: The predecessor's name for callbacks of its sync API.
SyncBatchCompletionCallback = Callable[[BatchMetadata], Any]

BatchKey = tuple[str, UUID]


class _BatchGetter(Protocol):
    async def get(self, domain: str, batch_id: UUID) -> BatchMetadata | None: ...


class _SyncBatchGetter(Protocol):
    def get(self, domain: str, batch_id: UUID) -> BatchMetadata | None: ...


# -- rows ----------------------------------------------------------------------------------------


def batch_from_row(row: Sequence[Any]) -> BatchMetadata:
    """BatchMetadata of a row in the column order of the `batch_get` statement."""
    (domain, batch_id, batch_type, name, custom_data, status, total, completed, failed, canceled,
     tsq, created_at, started_at, completed_at) = row  # fmt: skip
    return BatchMetadata(
        domain=domain,
        batch_id=batch_id,
        batch_type=batch_type,
        status=BatchStatus(status),
        name=name,
        custom_data=custom_data,
        total_count=total,
        completed_count=completed,
        failed_count=failed,
        canceled_count=canceled,
        in_troubleshooting_count=tsq,
        created_at=created_at,
        started_at=started_at,
        completed_at=completed_at,
    )


# -- the registry ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    callback: BatchCompletionCallback
    conninfo: str | None  # the database it was registered for (None: predecessor API, no pool)
    owner: object | None  # the CommandBus that registered it (dropped by its close())
    since: float


_lock = threading.Lock()  # guards _callbacks and _listeners; never held across an await
_callbacks: dict[BatchKey, _Entry] = {}
_listeners: dict[str, BatchListener] = {}
_tasks: set[asyncio.Task[None]] = set()  # running callbacks (asyncio keeps weak references)
#: The callback task of a batch while it runs (the step API waits for one the listener took).
_running: dict[BatchKey, asyncio.Task[None]] = {}

_sync_lock = threading.Lock()
_sync_batch_callbacks: dict[BatchKey, SyncBatchCompletionCallback] = {}


def _take(key: BatchKey, conninfo: str | None = None) -> _Entry | None:
    """Pop the callback of a batch: whoever gets it runs it, so it runs once. With `conninfo`,
    only a callback registered for that database (or for none) is taken."""
    with _lock:
        entry = _callbacks.get(key)
        if entry is None or (conninfo is not None and entry.conninfo not in (None, conninfo)):
            return None
        del _callbacks[key]
        return entry


async def _invoke(callback: BatchCompletionCallback, batch: BatchMetadata) -> None:
    """Run a callback; its exceptions are logged, never raised."""
    key = f"{batch.domain}.{batch.batch_id}"
    try:
        logger.info("invoking callback for batch %s (status=%s)", key, batch.status.value)
        if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            type(callback).__call__  # an object with an async __call__
        ):
            await callback(batch)
        else:
            result = await asyncio.to_thread(callback, batch)
            if inspect.isawaitable(result):  # e.g. a lambda returning a coroutine
                await result
    except Exception:
        logger.exception("batch callback error for %s", key)


def _spawn(callback: BatchCompletionCallback, batch: BatchMetadata) -> None:
    key = (batch.domain, batch.batch_id)
    task = asyncio.get_running_loop().create_task(
        _invoke(callback, batch), name=f"commandbus-batch-callback-{batch.batch_id}"
    )
    _tasks.add(task)
    _running[key] = task

    def done(t: asyncio.Task[None]) -> None:
        _tasks.discard(t)
        if _running.get(key) is t:
            del _running[key]

    task.add_done_callback(done)


def _fire_completed(rows: Sequence[Sequence[Any]], conninfo: str | None) -> set[BatchKey]:
    """Fire the callbacks of the terminal batches among `rows`; return the keys seen."""
    seen: set[BatchKey] = set()
    for row in rows:
        batch = batch_from_row(row)
        key = (batch.domain, batch.batch_id)
        seen.add(key)
        if batch.status in _TERMINAL and (entry := _take(key, conninfo)) is not None:
            _spawn(entry.callback, batch)
    return seen


async def register_batch_callback(
    domain: str,
    batch_id: UUID,
    callback: BatchCompletionCallback,
    *,
    pool: AsyncConnectionPool[Any] | None = None,
) -> None:
    """Register a callback for a batch's completion.

    Without `pool` (the predecessor's behaviour) it only runs through `invoke_batch_callback` /
    `check_and_invoke_batch_callback`, or when this process's listener hears the batch
    complete. With `pool` it is watched: the listener for that database runs until it fired.
    """
    if pool is not None:
        await watch_batch(pool, domain, batch_id, callback)
        return
    with _lock:
        _callbacks[(domain, batch_id)] = _Entry(callback, None, None, time.monotonic())
    logger.debug("registered callback for batch %s.%s", domain, batch_id)


async def watch_batch(
    pool: AsyncConnectionPool[Any],
    domain: str,
    batch_id: UUID,
    callback: BatchCompletionCallback,
    *,
    owner: object | None = None,
    conn: AsyncConnection[Any] | None = None,
) -> None:
    """Register `callback` and make sure this process listens to the pool's database. `conn`
    (the caller's transaction that created the batch) is used for the check at registration."""
    conninfo = pool_conninfo(pool)
    key = (domain, batch_id)
    with _lock:
        _callbacks[key] = _Entry(callback, conninfo, owner, time.monotonic())
        _ensure_listener(conninfo, _connect_kwargs(pool))
    # The batch may have completed (and been announced) before the callback existed.
    try:
        rows = await _db.fetch_all(
            conn or pool, "batch_get_many", [domain], [batch_id], domain=domain
        )
    except (psycopg.Error, CommandBusError) as err:
        logger.debug("batch %s.%s: check at registration failed (%s)", domain, batch_id, err)
        return
    _fire_completed(rows, conninfo)


def get_batch_callback(domain: str, batch_id: UUID) -> BatchCompletionCallback | None:
    """The callback registered for a batch, or None."""
    entry = _callbacks.get((domain, batch_id))
    return None if entry is None else entry.callback


async def remove_batch_callback(domain: str, batch_id: UUID) -> None:
    """Forget a batch's callback (it will not run)."""
    with _lock:
        _callbacks.pop((domain, batch_id), None)
    logger.debug("removed callback for batch %s.%s", domain, batch_id)


async def invoke_batch_callback(domain: str, batch_id: UUID, batch_repo: _BatchGetter) -> None:
    """Run a batch's callback now (the caller knows the batch is complete); then forget it."""
    entry = _take((domain, batch_id))
    if entry is None:
        return
    batch = await batch_repo.get(domain, batch_id)
    if batch is None:
        logger.warning("batch %s.%s not found for callback", domain, batch_id)
        return
    await _invoke(entry.callback, batch)


async def check_and_invoke_batch_callback(
    domain: str, batch_id: UUID, batch_repo: _BatchGetter
) -> None:
    """Run a batch's callback if the batch is complete (COMPLETED or COMPLETED_WITH_FAILURES);
    a callback whose batch does not exist is dropped."""
    if (domain, batch_id) not in _callbacks:
        return
    batch = await batch_repo.get(domain, batch_id)
    if batch is None:
        logger.warning("batch %s.%s not found for callback", domain, batch_id)
        await remove_batch_callback(domain, batch_id)
        return
    if batch.status not in _TERMINAL:
        return
    entry = _take((domain, batch_id))
    if entry is not None:
        await _invoke(entry.callback, batch)


async def run_callback_if_complete(
    pool: AsyncConnectionPool[Any], domain: str, batch_id: UUID
) -> None:
    """The step API's check after it applied an outcome of the batch's command: when the batch
    is now complete and this process holds its callback (registered for this pool's database,
    or without a pool), the callback runs here and is awaited, so it has run before
    ``Worker.complete()`` / ``fail*()`` returns, as with the predecessor. Whoever pops it from
    the registry runs it, so it runs once: when the NOTIFY listener heard the completion first
    and took it, this waits for that run instead. A failed lookup is logged; the listener fires
    the callback later then."""
    key = (domain, batch_id)
    if key in _callbacks:
        try:
            row = await _db.fetch_one(pool, "batch_get", domain, batch_id, domain=domain)
        except (psycopg.Error, CommandBusError) as err:
            logger.warning("batch %s.%s: completion check failed (%s)", domain, batch_id, err)
            return
        if row is None:
            return
        batch = batch_from_row(row)
        if batch.status not in _TERMINAL:
            return
        if (entry := _take(key, pool_conninfo(pool))) is not None:
            await _invoke(entry.callback, batch)
            return
    # The listener heard the completion first and took the callback: wait until it has run.
    task = _running.get(key)
    if task is not None and task.get_loop() is asyncio.get_running_loop():
        await asyncio.shield(task)


def clear_all_callbacks() -> None:
    """Forget every registered callback (mostly for tests). Idle listeners stop by themselves
    at their next check."""
    with _lock:
        _callbacks.clear()
    with _sync_lock:
        _sync_batch_callbacks.clear()
    logger.debug("cleared all batch callbacks")


async def release_batch_callbacks(owner: object) -> None:
    """Drop the pending callbacks `owner` (a CommandBus) registered, and stop the listeners
    that have nothing left to wait for. ``CommandBus.close()`` calls it."""
    stopping: list[BatchListener] = []
    with _lock:
        mine = [k for k, e in _callbacks.items() if e.owner is owner]
        dropped = {_callbacks.pop(k).conninfo for k in mine}
        for conninfo in dropped:
            listener = _listeners.get(conninfo) if conninfo is not None else None
            if listener is not None and not _has_pending_locked(listener.conninfo):
                listener._retire_locked()
                stopping.append(listener)
    if mine:
        logger.warning("closing: %d batch callbacks still pending were dropped", len(mine))
    for listener in stopping:
        await listener.stop()


# -- the predecessor's sync registry (used by the sync API) ------------------------------------


def register_batch_callback_sync(
    domain: str, batch_id: UUID, callback: SyncBatchCompletionCallback
) -> None:
    """Register a sync callback for a batch's completion."""
    with _sync_lock:
        _sync_batch_callbacks[(domain, batch_id)] = callback


def get_sync_batch_callback(domain: str, batch_id: UUID) -> SyncBatchCompletionCallback | None:
    """The sync callback registered for a batch, or None."""
    return _sync_batch_callbacks.get((domain, batch_id))


def remove_sync_batch_callback(domain: str, batch_id: UUID) -> None:
    """Forget a batch's sync callback."""
    with _sync_lock:
        _sync_batch_callbacks.pop((domain, batch_id), None)


def invoke_sync_batch_callback(domain: str, batch_id: UUID, batch_repo: _SyncBatchGetter) -> None:
    """Run a batch's sync callback now and forget it; its exceptions are logged."""
    with _sync_lock:
        callback = _sync_batch_callbacks.pop((domain, batch_id), None)
    if callback is None:
        return
    batch = batch_repo.get(domain, batch_id)
    if batch is None:
        logger.warning("batch %s.%s not found for sync callback", domain, batch_id)
        return
    try:
        callback(batch)
    except Exception:
        logger.exception("sync batch callback error for %s.%s", domain, batch_id)


# -- the listener ------------------------------------------------------------------------------


def _has_pending_locked(conninfo: str) -> bool:
    return any(e.conninfo == conninfo for e in _callbacks.values())


def _ensure_listener(conninfo: str, connect_kwargs: dict[str, Any]) -> BatchListener:
    """The running listener of a database in the current event loop (started if needed).
    Called with `_lock` held, so a listener retiring for idleness cannot miss a new callback."""
    listener = _listeners.get(conninfo)
    if listener is None or not listener.alive or listener.loop is not asyncio.get_running_loop():
        listener = BatchListener(conninfo, connect_kwargs)
        _listeners[conninfo] = listener
    return listener


# Connection options of a pool that the listener's own connection must not inherit.
_NOT_INHERITED = frozenset({"autocommit", "row_factory", "cursor_factory", "context"})


def _connect_kwargs(pool: AsyncConnectionPool[Any]) -> dict[str, Any]:
    """The pool's connection keyword arguments (a password, options...) for the listener."""
    kwargs = getattr(pool, "kwargs", None) or {}
    return {k: v for k, v in kwargs.items() if k not in _NOT_INHERITED}


def _parse(payload: str) -> BatchKey | None:
    domain, _, batch_id = payload.rpartition(":")
    try:
        return (domain, UUID(batch_id))
    except ValueError:
        return None


async def _close(conn: AsyncConnection[Any]) -> None:
    """Close a listener connection; one that went silent is closed without waiting on it."""
    try:
        await asyncio.wait_for(conn.close(), LISTENER_CALL_TIMEOUT)
    except TimeoutError:
        conn.pgconn.finish()


class BatchListener:
    """LISTENs on `commandbus_batch` on a dedicated autocommit connection and fires the
    callbacks of the batches it hears complete. One per database (conninfo) and event loop,
    started by the first watched callback; it stops by itself once no callback of its database
    is pending, or by `stop()`. It reconnects when its connection is lost; after LISTEN (and
    every reconnect) it checks all pending batches, and again every `LISTENER_POLL_INTERVAL`
    seconds, for completions it could not hear."""

    def __init__(self, conninfo: str, connect_kwargs: dict[str, Any] | None = None) -> None:
        self.conninfo = conninfo
        self._connect_kwargs = {
            **keepalive_kwargs(conninfo),
            **(connect_kwargs or {}),
            "autocommit": True,
            "application_name": LISTENER_APPLICATION_NAME,
        }
        self.loop = asyncio.get_running_loop()
        #: set while LISTEN is active
        self.listening = asyncio.Event()
        #: how many times LISTEN was established (1 + reconnects)
        self.connections = 0
        self._retired = False
        self._task = self.loop.create_task(self._run(), name=LISTENER_APPLICATION_NAME)

    @property
    def alive(self) -> bool:
        return not self._retired and not self._task.done() and not self.loop.is_closed()

    def _retire_locked(self) -> None:
        self._retired = True
        if _listeners.get(self.conninfo) is self:
            del _listeners[self.conninfo]

    def _retire_if_idle(self) -> bool:
        with _lock:
            if self._retired:
                return True
            if _has_pending_locked(self.conninfo):
                return False
            self._retire_locked()
            return True

    async def stop(self) -> None:
        """Stop listening (callbacks already running finish on their own)."""
        with _lock:
            self._retire_locked()
        if self._task.done() or self.loop.is_closed():
            return
        if asyncio.get_running_loop() is self.loop:
            self._task.cancel()
            await asyncio.wait([self._task])
        else:  # a listener of another thread's loop: cancel it there
            self.loop.call_soon_threadsafe(self._task.cancel)

    async def _run(self) -> None:
        delay = LISTENER_RECONNECT_DELAY[0]
        try:
            while not self._retire_if_idle():
                try:
                    conn = await asyncio.wait_for(
                        AsyncConnection.connect(self.conninfo, **self._connect_kwargs),
                        LISTENER_CALL_TIMEOUT,
                    )
                except (psycopg.Error, TimeoutError) as err:
                    logger.warning(
                        "batch listener cannot connect (%s); retry in %.1fs",
                        err or "no answer", delay,
                    )  # fmt: skip
                else:
                    try:
                        await asyncio.wait_for(
                            _db.execute(conn, "batch_listen"), LISTENER_CALL_TIMEOUT
                        )
                        self.connections += 1
                        self.listening.set()
                        delay = LISTENER_RECONNECT_DELAY[0]
                        await self._serve(conn)
                        return
                    except Exception as err:
                        logger.warning(
                            "batch listener lost its connection (%s); reconnecting",
                            err or "no answer",
                        )
                    finally:
                        self.listening.clear()
                        await _close(conn)
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTENER_RECONNECT_DELAY[1])
        finally:
            with _lock:
                self._retire_locked()

    def _pending(self) -> list[BatchKey]:
        with _lock:
            return [k for k, e in _callbacks.items() if e.conninfo == self.conninfo]

    def _announced(self, keys: list[BatchKey]) -> list[BatchKey]:
        with _lock:
            return [
                k
                for k in keys
                if (e := _callbacks.get(k)) is not None and e.conninfo in (None, self.conninfo)
            ]

    async def _serve(self, conn: AsyncConnection[Any]) -> None:
        await self._check(conn, self._pending())
        next_poll = time.monotonic() + LISTENER_POLL_INTERVAL
        while not self._retire_if_idle():
            heard: list[BatchKey] = []
            wait = max(0.0, next_poll - time.monotonic())
            async for note in conn.notifies(timeout=wait, stop_after=1):
                if (key := _parse(note.payload)) is not None:
                    heard.append(key)
            if time.monotonic() >= next_poll:
                await self._check(conn, self._pending())
                next_poll = time.monotonic() + LISTENER_POLL_INTERVAL
            elif heard:
                await self._check(conn, self._announced(heard))

    async def _check(self, conn: AsyncConnection[Any], keys: list[BatchKey]) -> None:
        """Fire the callbacks of the complete batches among `keys`; drop orphans. Raises
        TimeoutError when the connection does not answer within `LISTENER_CALL_TIMEOUT`."""
        if not keys:
            return
        rows = await asyncio.wait_for(
            _db.fetch_all(conn, "batch_get_many", [k[0] for k in keys], [k[1] for k in keys]),
            LISTENER_CALL_TIMEOUT,
        )
        seen = _fire_completed(rows, self.conninfo)
        now = time.monotonic()
        with _lock:
            for key in keys:
                entry = _callbacks.get(key)
                if key not in seen and entry is not None and now - entry.since > ORPHAN_GRACE:
                    del _callbacks[key]
                    logger.warning("batch %s.%s does not exist: callback dropped", *key)


__all__ = [
    "BATCH_TYPES",
    "BatchCompletionCallback",
    "BatchListener",
    "DuplicateBatchError",
    "SyncBatchCompletionCallback",
    "check_and_invoke_batch_callback",
    "clear_all_callbacks",
    "get_batch_callback",
    "get_sync_batch_callback",
    "invoke_batch_callback",
    "invoke_sync_batch_callback",
    "register_batch_callback",
    "register_batch_callback_sync",
    "release_batch_callbacks",
    "remove_batch_callback",
    "remove_sync_batch_callback",
    "run_callback_if_complete",
    "watch_batch",
]
