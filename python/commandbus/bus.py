"""CommandBus: send commands (Rust path, or the caller's psycopg connection) and query them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _db, _native, retention
from commandbus._bridge import call
from commandbus._dsn import (
    DEFAULT_CALL_TIMEOUT,
    native_dsn,
    pool_conninfo,
    validate_call_timeout,
)
from commandbus._validation import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    command_message,
    encode_json,
    validate_command_type,
    validate_data,
    validate_domain,
    validate_int,
    validate_max_attempts,
    validate_queue_name,
    validate_text,
    validate_uuid,
)
from commandbus.batch import (
    BATCH_TYPES,
    BatchCompletionCallback,
    release_batch_callbacks,
    watch_batch,
)
from commandbus.exceptions import DuplicateCommandError, ValidationError
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
from commandbus.repositories.audit import PostgresAuditLogger
from commandbus.repositories.batch import PostgresBatchRepository
from commandbus.repositories.command import PostgresCommandRepository
from commandbus.retention import DEFAULT_PRUNE_CHUNK_SIZE, PruneResult

logger = logging.getLogger(__name__)

DEFAULT_BATCH_CHUNK_SIZE = 1_000
#: Chunks of `send_batch` whose statements run at once on the Rust path (commits stay in order).
SEND_PIPELINE_DEPTH = 2
#: Commands per native call of `send_batch` (the pipeline refills within a call, and
#: `on_progress` is called after each).
SEND_GROUP_COMMANDS = 16_000

ProgressCallback = Callable[[int, int], None]


class _Columns:
    """The validated commands of one domain as the columns `send_commands_v2` takes: each
    command's queue message is built here, with its correlation id (generated when absent)."""

    __slots__ = (
        "batch_ids",
        "command_ids",
        "command_types",
        "correlation_ids",
        "max_attempts",
        "messages",
        "reply_tos",
    )

    def __init__(self) -> None:
        self.command_ids: list[UUID] = []
        self.command_types: list[str] = []
        self.messages: list[str] = []
        self.correlation_ids: list[UUID] = []
        self.reply_tos: list[str | None] = []
        self.max_attempts: list[int | None] = []
        self.batch_ids: list[UUID | None] = []

    def as_args(self) -> tuple[Any, ...]:
        return (
            self.command_ids,
            self.command_types,
            self.messages,
            self.correlation_ids,
            self.reply_tos,
            self.max_attempts,
            self.batch_ids,
        )


#: One chunk of `send_batch`: each request's place (domain, index in its domain's columns),
#: and the columns of each domain.
_Chunk = tuple[list[tuple[str, int]], dict[str, _Columns]]


def _collect_results(
    results: list[SendResult], group: list[_Chunk], sent: Iterator[list[int]]
) -> None:
    """Append the SendResults of `group`'s chunks, in request order, to `results`; `sent`
    yields the msg_ids of each chunk's domains in the order of their columns."""
    for places, by_domain in group:
        msg_ids = {d: next(sent) for d in by_domain}
        results.extend(
            SendResult(command_id=by_domain[d].command_ids[i], msg_id=msg_ids[d][i])
            for d, i in places
        )


class CommandBus:
    """Sends commands and answers questions about them.

    `send` and `send_batch` go through the Rust engine, which connects with the pool's
    conninfo. With `conn=` they run the same SQL on the caller's psycopg connection instead,
    inside the caller's transaction, so the command commits or rolls back with the caller's
    business rows.

    Example:
        bus = CommandBus(pool)
        await bus.send("orders", "CreateOrder", uuid4(), {"sku": "A1"})
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        default_max_attempts: int | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        native_max_connections: int = 10,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        """Args:
        pool: the psycopg async pool (queries, and the conninfo the engine connects with).
        default_max_attempts: stored on commands sent without `max_attempts`; None leaves the
            choice to the worker's RetryPolicy.
        max_payload_bytes: largest encoded `data` accepted (PayloadTooLargeError above it).
        native_max_connections: size of the Rust engine's own pool.
        call_timeout: deadline in seconds of one send of the Rust engine (plus 1 ms per
            command it carries): with no answer by then its connection is abandoned and the
            send raises `DatabaseError` (its outcome unknown: a resend of the same command_id
            names it as a duplicate if it was written after all). The library's own calls on
            `pool` (queries, TSQ and batch bookkeeping) get three times this as their
            deadline (`DatabaseError` when it passes; the connection is cancelled or closed).
        """
        self._pool = pool
        self._default_max_attempts = validate_max_attempts(default_max_attempts)
        self._max_payload_bytes = max_payload_bytes
        self._native = _native.NativeBus(
            native_dsn(pool_conninfo(pool)),
            native_max_connections,
            call_timeout=validate_call_timeout(call_timeout),
            application_name="rcmd bus",
        )
        if isinstance(pool, AsyncConnectionPool):
            _db.set_pool_deadline(pool, 3 * call_timeout)
        self._commands = PostgresCommandRepository(pool)
        self._audit = PostgresAuditLogger(pool)

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        return self._pool

    async def close(self) -> None:
        """Stop this bus's batch-completion listener (dropping callbacks still pending) and
        close the Rust engine's connections (the caller's pool stays open)."""
        await self._close_batch_listener()
        await call(self._native.close)

    async def prune(
        self,
        older_than: datetime | timedelta,
        domain: str | None = None,
        *,
        chunk_size: int = DEFAULT_PRUNE_CHUNK_SIZE,
        on_progress: Callable[[PruneResult], None] | None = None,
        max_duty: float = 1.0,
    ) -> PruneResult:
        """Delete terminal commands (COMPLETED, FAILED, CANCELED) last updated before the
        cutoff, with their archived messages, in chunks of `chunk_size` (one transaction
        each), then drop the audit trail's day partitions that end before the cutoff and that
        no remaining command or batch uses. Nothing pending, in flight, in the TSQ, or in a
        batch or process that has not ended is touched. `max_duty` paces it (see
        `commandbus.retention.prune`)."""
        return await retention.prune(
            self._pool, older_than, domain, chunk_size=chunk_size, on_progress=on_progress,
            max_duty=max_duty,
        )  # fmt: skip

    # -- sending -------------------------------------------------------------------------

    def _add(
        self, cols: _Columns, req: SendRequest, encoded: dict[int, tuple[object, str]] | None = None
    ) -> None:
        """Validate one request (its domain already validated) and append it to `cols`.

        `encoded` (the payloads encoded so far in this call, by ``id()``, each with its object,
        which keeps the object alive so that its id is not reused) spares encoding a payload
        object that many requests share (bulk sends) again; nothing runs between two requests
        of a call that could change it."""
        command_id = validate_uuid(req.command_id, "command_id")
        command_type = validate_command_type(req.command_type)
        known = None if encoded is None else encoded.get(id(req.data))
        if known is not None:
            data = known[1]
        else:
            data = encode_json(validate_data(req.data), "data", self._max_payload_bytes)
            if encoded is not None:
                encoded[id(req.data)] = (req.data, data)
        correlation_id = (
            uuid4()
            if req.correlation_id is None
            else validate_uuid(req.correlation_id, "correlation_id")
        )
        reply_to = None if req.reply_to is None else validate_queue_name(req.reply_to)
        cols.command_ids.append(command_id)
        cols.command_types.append(command_type)
        cols.messages.append(
            command_message(req.domain, command_type, command_id, correlation_id, reply_to, data)
        )
        cols.correlation_ids.append(correlation_id)
        cols.reply_tos.append(reply_to)
        ma = validate_max_attempts(req.max_attempts)
        cols.max_attempts.append(ma if ma is not None else self._default_max_attempts)
        cols.batch_ids.append(
            None if req.batch_id is None else validate_uuid(req.batch_id, "batch_id")
        )

    async def _send_columns(
        self, domain: str, cols: _Columns, conn: AsyncConnection[Any] | None
    ) -> list[int]:
        """Send one domain's columns in one call; return the msg_ids in input order."""
        if conn is None:
            args = cols.as_args()
            return await call(lambda c: self._native.send(c, (domain, *args)))  # type: ignore[no-any-return]
        # On the caller's connection: the statement joins the caller's transaction.
        rows = await _db.fetch_all(conn, "send_commands", domain, *cols.as_args(), domain=domain)
        return [r[0] for r in rows]

    async def send(
        self,
        domain: str,
        command_type: str,
        command_id: UUID,
        data: dict[str, Any],
        correlation_id: UUID | None = None,
        reply_to: str | None = None,
        max_attempts: int | None = None,
        batch_id: UUID | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> SendResult:
        """Send one command to `{domain}__commands`.

        Raises:
            ValidationError: bad domain, command type, ids, reply queue or data (nothing written).
            DuplicateCommandError: `command_id` already exists in the domain.
            BatchNotFoundError: `batch_id` names no batch of the domain.
        """
        validate_domain(domain)
        cols = _Columns()
        self._add(
            cols,
            SendRequest(
                domain=domain,
                command_type=command_type,
                command_id=command_id,
                data=data,
                correlation_id=correlation_id,
                reply_to=reply_to,
                max_attempts=max_attempts,
                batch_id=batch_id,
            ),
        )
        (msg_id,) = await self._send_columns(domain, cols, conn)
        return SendResult(command_id=cols.command_ids[0], msg_id=msg_id)

    def _validated_chunks(self, requests: Sequence[SendRequest], chunk_size: int) -> list[_Chunk]:
        """Validate and encode every request first (a bad request anywhere writes nothing), in
        chunks of `chunk_size`; each request keeps its place as (domain, index in that
        domain's columns). A command_id repeated within `requests` is a DuplicateCommandError."""
        chunks: list[_Chunk] = []
        seen: set[tuple[str, UUID]] = set()
        encoded: dict[int, tuple[object, str]] = {}
        for start in range(0, len(requests), chunk_size):
            places: list[tuple[str, int]] = []
            by_domain: dict[str, _Columns] = {}
            for req in requests[start : start + chunk_size]:
                cols = by_domain.get(req.domain)
                if cols is None:
                    validate_domain(req.domain)
                    cols = by_domain[req.domain] = _Columns()
                self._add(cols, req, encoded)
                key = (req.domain, cols.command_ids[-1])
                if key in seen:
                    raise DuplicateCommandError(req.domain, str(req.command_id))
                seen.add(key)
                places.append((req.domain, len(cols.command_ids) - 1))
            chunks.append((places, by_domain))
        return chunks

    async def send_batch(
        self,
        requests: Sequence[SendRequest],
        chunk_size: int = DEFAULT_BATCH_CHUNK_SIZE,
        conn: AsyncConnection[Any] | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> BatchSendResult:
        """Send many commands, one atomic transaction per chunk and domain.

        Every request is validated before anything is written. Results keep the order of
        `requests`. On the Rust path two chunks' statements run at once (chunks of plain
        commands: no batch_id, no reply_to), but each chunk commits only after the chunks
        before it did. `on_progress(sent, total)` is called as chunks commit: after each chunk
        with `conn`, else after each group of chunks of about 16,000 commands.

        Raises:
            ValidationError, DuplicateCommandError (also for a repeated id inside `requests`),
            BatchNotFoundError. What comes before the failing chunk (and domain) stays sent,
            nothing after it (with `conn`, everything is in the caller's transaction); the
            error's note says how many commands were sent.
        """
        validate_int("chunk_size", chunk_size, 1)
        total = len(requests)
        if total == 0:
            return BatchSendResult(results=[], chunks_processed=0, total_commands=0)
        chunks = self._validated_chunks(requests, chunk_size)
        results: list[SendResult] = []

        def collect(group: list[_Chunk], sent: Iterator[list[int]]) -> None:
            _collect_results(results, group, sent)
            if on_progress is not None:
                on_progress(len(results), total)
            logger.debug("send_batch: %d/%d commands sent", len(results), total)

        if conn is not None:
            for chunk in chunks:
                sent = [await self._send_columns(d, cols, conn) for d, cols in chunk[1].items()]
                collect([chunk], iter(sent))
            return BatchSendResult(
                results=results, chunks_processed=len(chunks), total_commands=total
            )
        per_call = max(1, SEND_GROUP_COMMANDS // chunk_size)
        for start in range(0, len(chunks), per_call):
            group = chunks[start : start + per_call]
            units = [
                (d, *cols.as_args()) for _, by_domain in group for d, cols in by_domain.items()
            ]
            try:
                sent = await call(
                    lambda c: self._native.send_ordered(c, units, SEND_PIPELINE_DEPTH)  # noqa: B023
                )
            except Exception as err:
                done = len(results) + sum(len(u[1]) for u in units[: getattr(err, "units_sent", 0)])
                err.add_note(f"send_batch: {done} of {total} commands were sent before this error")
                raise
            collect(group, iter(sent))
        return BatchSendResult(results=results, chunks_processed=len(chunks), total_commands=total)

    # -- queries (the predecessor's repositories do the reading) -------------------------

    async def get_command(self, domain: str, command_id: UUID) -> CommandMetadata | None:
        """Return the command's metadata, or None when it does not exist."""
        return await self._commands.get(domain, validate_uuid(command_id, "command_id"))

    async def command_exists(self, domain: str, command_id: UUID) -> bool:
        """Return True when the command exists in the domain."""
        return await self._commands.exists(domain, validate_uuid(command_id, "command_id"))

    async def get_audit_trail(
        self, command_id: UUID, domain: str | None = None
    ) -> list[AuditEvent]:
        """Return the command's audit events in chronological order (empty when unknown)."""
        return await self._audit.get_events(command_id, domain)

    async def query_commands(
        self,
        status: CommandStatus | None = None,
        domain: str | None = None,
        command_type: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CommandMetadata]:
        """Return commands matching the filters, newest first."""
        return await self._commands.query(
            status, domain, command_type, created_after, created_before, limit, offset
        )

    # -- batches -------------------------------------------------------------------------

    async def create_batch(
        self,
        domain: str,
        commands: Sequence[BatchCommand],
        *,
        batch_id: UUID | None = None,
        name: str | None = None,
        custom_data: dict[str, Any] | None = None,
        on_complete: BatchCompletionCallback | None = None,
        batch_type: str = "COMMAND",
        conn: AsyncConnection[Any] | None = None,
    ) -> CreateBatchResult:
        """Create a batch and send its commands atomically (one SQL call, `create_batch_v2`).

        The batch row (status PENDING, `total_count = len(commands)`), the commands, their
        queue messages and SENT audit rows commit together, or nothing does. With `conn` it
        all happens in the caller's transaction. `on_complete(batch)` runs exactly once in this
        process when the batch completes, whichever process finishes its last command (async
        callables are awaited, plain ones run in a thread; exceptions are logged). Pending
        callbacks are dropped by `close()`.

        `total_count` is fixed at creation, as in the predecessor: a command sent later with
        `send(..., batch_id=)` is linked to the batch and counted when it finishes, but does not
        raise `total_count`, so the batch may complete before it. Put every command of a batch
        in `create_batch`.

        Raises:
            ValidationError: empty `commands`, a non-BatchCommand item, bad ids, names, data,
                custom_data, batch_type or on_complete (nothing written).
            DuplicateCommandError: a command_id repeated in `commands` (nothing written) or
                already stored in the domain (everything rolled back).
            DuplicateBatchError (an InvalidOperationError): `batch_id` already exists.
        """
        validate_domain(domain)
        if isinstance(commands, str | bytes) or not isinstance(commands, Sequence):
            raise ValidationError("commands", commands, "must be a list of BatchCommand")
        if not commands:
            raise ValidationError("commands", commands, "a batch needs at least one command")
        bid = uuid4() if batch_id is None else validate_uuid(batch_id, "batch_id")
        validate_text("name", name, optional=True)
        custom_json = (
            None
            if custom_data is None
            else encode_json(validate_data(custom_data), "custom_data", self._max_payload_bytes)
        )
        if batch_type not in BATCH_TYPES:
            raise ValidationError("batch_type", batch_type, f"must be one of {BATCH_TYPES}")
        if on_complete is not None and not callable(on_complete):
            raise ValidationError("on_complete", on_complete, "must be callable")
        cols = _Columns()
        seen: set[UUID] = set()
        encoded: dict[int, tuple[object, str]] = {}
        for cmd in commands:
            if not isinstance(cmd, BatchCommand):
                raise ValidationError("commands", cmd, "items must be BatchCommand")
            req = SendRequest(domain, cmd.command_type, cmd.command_id, cmd.data,
                              cmd.correlation_id, cmd.reply_to, cmd.max_attempts)  # fmt: skip
            self._add(cols, req, encoded)
            if cols.command_ids[-1] in seen:
                raise DuplicateCommandError(domain, str(cols.command_ids[-1]))
            seen.add(cols.command_ids[-1])
        columns = (cols.command_ids, cols.command_types, cols.messages, cols.correlation_ids,
                   cols.reply_tos, cols.max_attempts)  # fmt: skip
        rows = await PostgresBatchRepository(self._pool).create(
            domain, bid, batch_type, name, custom_json, columns, conn
        )
        if on_complete is not None:
            await watch_batch(self._pool, domain, bid, on_complete, owner=self, conn=conn)
        logger.info("created batch %s in %s with %d commands", bid, domain, len(rows))
        return CreateBatchResult(
            batch_id=bid,
            command_results=[SendResult(command_id=r[0], msg_id=r[1]) for r in rows],
            total_commands=len(rows),
        )

    async def get_batch(self, domain: str, batch_id: UUID) -> BatchMetadata | None:
        """Return the batch's metadata (counters, status), or None when it does not exist."""
        bid = validate_uuid(batch_id, "batch_id")
        return await PostgresBatchRepository(self._pool).get(domain, bid)

    async def list_batches(
        self,
        domain: str,
        *,
        status: BatchStatus | None = None,
        limit: int = 100,
        offset: int = 0,
        waiting_for_operator: bool | None = None,
    ) -> list[BatchMetadata]:
        """Return the domain's batches, newest first, optionally only those in `status`.

        `waiting_for_operator=True` returns only the batches whose remaining commands all wait
        in the troubleshooting queue (`BatchMetadata.waiting_for_operator`: such a batch stays
        IN_PROGRESS and runs no `on_complete` until an operator acts), False only the others.
        """
        return await PostgresBatchRepository(self._pool).list_batches(
            domain,
            status=status,
            limit=limit,
            offset=offset,
            waiting_for_operator=waiting_for_operator,
        )

    async def list_batch_commands(
        self,
        domain: str,
        batch_id: UUID,
        *,
        status: CommandStatus | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CommandMetadata]:
        """Return the batch's commands in the order they were sent, optionally only those in
        `status`."""
        bid = validate_uuid(batch_id, "batch_id")
        return await self._commands.list_by_batch(
            domain, bid, status=status, limit=limit, offset=offset
        )

    async def _close_batch_listener(self) -> None:
        """Drop the batch callbacks this bus registered that are still pending and stop the
        batch listener when no other callback of its database waits. `close()` calls it."""
        await release_batch_callbacks(self)


__all__ = ["DEFAULT_BATCH_CHUNK_SIZE", "SEND_GROUP_COMMANDS", "SEND_PIPELINE_DEPTH", "CommandBus"]
