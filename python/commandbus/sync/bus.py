"""SyncCommandBus: the `CommandBus` API, blocking, for code without asyncio.

Under it is the async `CommandBus` and its Rust engine, driven from a private event loop that
runs in a daemon thread owned by the bus (started by the first call that needs it, stopped by
`close()`). A call blocks the calling thread on that loop's result, without holding the GIL,
so any number of threads can use one bus at once. The transactional send (`conn=`, a psycopg
sync `Connection`) runs the same `send_commands` statement on the caller's connection, in the
caller's thread and transaction, and needs no loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from commandbus import _db_sync, _validation
from commandbus._dsn import DEFAULT_CALL_TIMEOUT
from commandbus._validation import DEFAULT_MAX_PAYLOAD_BYTES, validate_domain, validate_int
from commandbus.batch import BatchCompletionCallback
from commandbus.bus import DEFAULT_BATCH_CHUNK_SIZE, CommandBus, _collect_results, _Columns
from commandbus.exceptions import ValidationError
from commandbus.models import (
    AuditEvent,
    BatchCommand,
    BatchMetadata,
    BatchSendResult,
    BatchStatus,
    CommandMetadata,
    CommandStatus,
    CreateBatchResult,
    SendRequest,
    SendResult,
)
from commandbus.retention import DEFAULT_PRUNE_CHUNK_SIZE, PruneResult
from commandbus.sync._loop import LoopThread
from commandbus.sync._pool import async_twin, sync_pool_settings

T = TypeVar("T")


def _sync_conn(conn: object) -> psycopg.Connection[Any]:
    if not isinstance(conn, psycopg.Connection):
        raise ValidationError("conn", conn, "must be a psycopg (sync) Connection")
    return conn


class SyncCommandBus:
    """Sends commands and answers questions about them, blocking; thread-safe.

    Every method of the async `CommandBus`, with the same arguments, validation, errors and
    results. Queries and batches run on an internal `AsyncConnectionPool` opened (on the
    bus's loop) with the sync pool's conninfo and connection kwargs, at most `pool.max_size`
    connections; `send`/`send_batch` without `conn` go through the Rust engine's own pool.
    The sync pool itself is only used for its settings: the caller keeps it for its own work.

    Example:
        bus = SyncCommandBus(pool)
        bus.send("orders", "CreateOrder", uuid4(), {"sku": "A1"})
        with pool.connection() as conn, conn.transaction():
            conn.execute("INSERT INTO orders ...")
            bus.send("orders", "CreateOrder", uuid4(), {"sku": "A1"}, conn=conn)
        bus.close()
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        default_max_attempts: int | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        native_max_connections: int = 10,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        """Args as for `CommandBus`; `pool` is a `psycopg_pool.ConnectionPool`."""
        conninfo, kwargs = sync_pool_settings(pool)
        self._pool = pool
        self._apool = async_twin(
            conninfo, kwargs, int(getattr(pool, "max_size", 4)), "rcmd-sync-bus"
        )
        self._bus = CommandBus(
            self._apool,
            default_max_attempts,
            max_payload_bytes=max_payload_bytes,
            native_max_connections=native_max_connections,
            call_timeout=call_timeout,
        )
        self._lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._opened: asyncio.Lock | None = None
        self._pool_open = False
        self._closed = False

    @property
    def pool(self) -> ConnectionPool[Any]:
        """The caller's sync pool."""
        return self._pool

    # -- the private loop ----------------------------------------------------------------

    def _runner(self) -> LoopThread:
        with self._lock:
            if self._closed:
                raise RuntimeError("SyncCommandBus is closed")
            if self._loop is None:
                self._loop = LoopThread("rcmd-sync-bus")
            return self._loop

    async def _open_pool(self) -> None:
        if self._pool_open:
            return
        if self._opened is None:
            self._opened = asyncio.Lock()
        async with self._opened:
            if not self._pool_open:
                await self._apool.open()
                self._pool_open = True

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]], *, pool: bool = True) -> T:
        """Run `fn()` (a coroutine of the async bus) on the loop, the internal pool opened
        first when the call needs it; return its result or raise its exception."""

        async def run() -> T:
            if pool:
                await self._open_pool()
            return await fn()

        # A send made inside a span carries its trace context (commandbus.tracing): the
        # message is built on the loop thread, so it runs in the caller's context then.
        carry = _validation.message_trace_context is not None
        return self._runner().run(run(), caller_context=carry)

    def close(self) -> None:
        """Drop pending batch callbacks, close the engine's connections and the internal pool,
        and stop the loop thread. The caller's pool stays open. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            try:
                await self._bus.close()
            finally:
                if self._pool_open:
                    await self._apool.close()

        try:
            loop.run(shutdown())
        finally:
            loop.close()

    def __enter__(self) -> SyncCommandBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------

    def send(
        self,
        domain: str,
        command_type: str,
        command_id: UUID,
        data: dict[str, Any],
        correlation_id: UUID | None = None,
        reply_to: str | None = None,
        max_attempts: int | None = None,
        batch_id: UUID | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> SendResult:
        """Send one command to `{domain}__commands`; with `conn`, inside the caller's
        transaction on that connection (it commits or rolls back with the caller's rows).

        Raises:
            ValidationError, DuplicateCommandError, BatchNotFoundError, as `CommandBus.send`.
        """
        if conn is None:
            return self._call(
                lambda: self._bus.send(
                    domain, command_type, command_id, data, correlation_id, reply_to,
                    max_attempts, batch_id,
                ),
                pool=False,
            )  # fmt: skip
        sync_conn = _sync_conn(conn)
        validate_domain(domain)
        cols = _Columns()
        self._bus._add(
            cols,
            SendRequest(domain, command_type, command_id, data, correlation_id, reply_to,
                        max_attempts, batch_id),
        )  # fmt: skip
        (msg_id,) = self._send_columns_on(sync_conn, domain, cols)
        return SendResult(command_id=cols.command_ids[0], msg_id=msg_id)

    @staticmethod
    def _send_columns_on(conn: psycopg.Connection[Any], domain: str, cols: _Columns) -> list[int]:
        rows = _db_sync.fetch_all(conn, "send_commands", domain, *cols.as_args(), domain=domain)
        return [r[0] for r in rows]

    def send_batch(
        self,
        requests: Sequence[SendRequest],
        chunk_size: int = DEFAULT_BATCH_CHUNK_SIZE,
        conn: psycopg.Connection[Any] | None = None,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> BatchSendResult:
        """Send many commands, one transaction per chunk (and domain), as
        `CommandBus.send_batch`; with `conn` everything runs in the caller's transaction.
        `on_progress(sent, total)` runs in the calling thread with `conn`, else on the bus's
        loop thread."""
        if conn is None:
            return self._call(
                lambda: self._bus.send_batch(requests, chunk_size, on_progress=on_progress),
                pool=False,
            )
        sync_conn = _sync_conn(conn)
        validate_int("chunk_size", chunk_size, 1)
        total = len(requests)
        if total == 0:
            return BatchSendResult(results=[], chunks_processed=0, total_commands=0)
        chunks = self._bus._validated_chunks(requests, chunk_size)
        results: list[SendResult] = []
        for chunk in chunks:
            sent = [self._send_columns_on(sync_conn, d, cols) for d, cols in chunk[1].items()]
            _collect_results(results, [chunk], iter(sent))
            if on_progress is not None:
                on_progress(len(results), total)
        return BatchSendResult(results=results, chunks_processed=len(chunks), total_commands=total)

    # -- queries -------------------------------------------------------------------------

    def get_command(self, domain: str, command_id: UUID) -> CommandMetadata | None:
        """The command's metadata, or None when it does not exist."""
        return self._call(lambda: self._bus.get_command(domain, command_id))

    def command_exists(self, domain: str, command_id: UUID) -> bool:
        """True when the command exists in the domain."""
        return self._call(lambda: self._bus.command_exists(domain, command_id))

    def get_audit_trail(self, command_id: UUID, domain: str | None = None) -> list[AuditEvent]:
        """The command's audit events in chronological order (empty when unknown)."""
        return self._call(lambda: self._bus.get_audit_trail(command_id, domain))

    def query_commands(
        self,
        status: CommandStatus | None = None,
        domain: str | None = None,
        command_type: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CommandMetadata]:
        """Commands matching the filters, newest first."""
        return self._call(
            lambda: self._bus.query_commands(
                status, domain, command_type, created_after, created_before, limit, offset
            )
        )

    # -- batches -------------------------------------------------------------------------

    def create_batch(
        self,
        domain: str,
        commands: Sequence[BatchCommand],
        *,
        batch_id: UUID | None = None,
        name: str | None = None,
        custom_data: dict[str, Any] | None = None,
        on_complete: BatchCompletionCallback | None = None,
        batch_type: str = "COMMAND",
    ) -> CreateBatchResult:
        """Create a batch and send its commands atomically, as `CommandBus.create_batch`.
        `on_complete(batch)` (a plain `def` runs in a thread, as in the async API) is called
        once when the batch completes, while the bus is open; `close()` drops it."""
        return self._call(
            lambda: self._bus.create_batch(
                domain, commands, batch_id=batch_id, name=name, custom_data=custom_data,
                on_complete=on_complete, batch_type=batch_type,
            )
        )  # fmt: skip

    def get_batch(self, domain: str, batch_id: UUID) -> BatchMetadata | None:
        """The batch's metadata, or None when it does not exist."""
        return self._call(lambda: self._bus.get_batch(domain, batch_id))

    def list_batches(
        self,
        domain: str,
        *,
        status: BatchStatus | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[BatchMetadata]:
        """The domain's batches, newest first, optionally only those in `status`."""
        return self._call(
            lambda: self._bus.list_batches(domain, status=status, limit=limit, offset=offset)
        )

    def list_batch_commands(
        self,
        domain: str,
        batch_id: UUID,
        *,
        status: CommandStatus | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CommandMetadata]:
        """The batch's commands in the order they were sent, optionally only those in
        `status`."""
        return self._call(
            lambda: self._bus.list_batch_commands(
                domain, batch_id, status=status, limit=limit, offset=offset
            )
        )

    # -- retention -----------------------------------------------------------------------

    def prune(
        self,
        older_than: datetime | timedelta,
        domain: str | None = None,
        *,
        chunk_size: int = DEFAULT_PRUNE_CHUNK_SIZE,
        on_progress: Callable[[PruneResult], None] | None = None,
        max_duty: float = 1.0,
    ) -> PruneResult:
        """Delete old terminal commands and drop old audit partitions, as `CommandBus.prune`."""
        return self._call(
            lambda: self._bus.prune(
                older_than,
                domain,
                chunk_size=chunk_size,
                on_progress=on_progress,
                max_duty=max_duty,
            )
        )


__all__ = ["SyncCommandBus"]
