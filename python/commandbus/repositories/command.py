"""Command metadata repository: the predecessor's `PostgresCommandRepository` over our schema.

The bus and the worker do not use it (they call the protocol functions in batches);
it serves code written against `reliable-cmd` that reads or edits command rows directly.
Its writes are plain row updates: they are not fenced by a lease like the worker's outcomes.
The predecessor's `sp_*` methods keep their meaning as single statements
(the `repo_sp_*` statements of `sql/statements/commands.sql`); batch counters move through
`apply_batch_delta_v1`.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import orjson
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus._validation import validate_page, validate_uuid
from commandbus.exceptions import DuplicateCommandError, ValidationError
from commandbus.models import CommandMetadata, CommandStatus
from commandbus.policies import DEFAULT_RETRY_POLICY

logger = logging.getLogger(__name__)

Row = dict[str, Any]


class CommandRepository(Protocol):
    """Protocol for command metadata storage."""

    async def save(
        self, metadata: CommandMetadata, queue_name: str, conn: AsyncConnection[Any] | None = None
    ) -> None: ...

    async def get(
        self, domain: str, command_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> CommandMetadata | None: ...

    async def update_status(
        self,
        domain: str,
        command_id: UUID,
        status: CommandStatus,
        conn: AsyncConnection[Any] | None = None,
    ) -> None: ...

    async def exists(
        self, domain: str, command_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> bool: ...

    async def query(
        self,
        status: CommandStatus | None = None,
        domain: str | None = None,
        command_type: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CommandMetadata]: ...


def metadata_from_row(row: Row) -> CommandMetadata:
    """A `CommandMetadata` from a row with the columns of `get_command`, read by name."""
    max_attempts = row["max_attempts"]
    return CommandMetadata(
        domain=row["domain"],
        command_id=row["command_id"],
        command_type=row["command_type"],
        status=CommandStatus(row["status"]),
        attempts=row["attempts"],
        max_attempts=DEFAULT_RETRY_POLICY.max_attempts if max_attempts is None else max_attempts,
        msg_id=row["msg_id"],
        correlation_id=row["correlation_id"],
        reply_to=row["reply_to"],
        last_error_type=row["last_error_type"],
        last_error_code=row["last_error_code"],
        last_error_msg=row["last_error_msg"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        batch_id=row["batch_id"],
        result=row.get("result"),
    )


def _status(value: CommandStatus | str) -> str:
    try:
        return CommandStatus(value).value
    except ValueError:
        raise ValidationError("status", value, "is not a CommandStatus") from None


class PostgresCommandRepository:
    """PostgreSQL implementation of `CommandRepository` (every method takes `conn=` to join
    the caller's transaction, except the list queries)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        """Args:
        pool: the psycopg async pool used when no `conn=` is given.
        """
        self._pool = pool

    # -- writing rows ----------------------------------------------------------------------

    async def save(
        self, metadata: CommandMetadata, queue_name: str, conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Insert a command row (no queue message, no audit row).

        Raises:
            DuplicateCommandError: the command_id already exists in the domain.
        """
        await self.save_batch([metadata], queue_name, conn)

    async def save_batch(
        self,
        metadata_list: list[CommandMetadata],
        queue_name: str,
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Insert many command rows in one statement (all or none).

        Raises:
            DuplicateCommandError: a command_id already exists in its domain.
        """
        if not metadata_list:
            return
        cols: list[list[Any]] = [[] for _ in range(13)]
        for m in metadata_list:
            values = (m.domain, queue_name, m.msg_id, validate_uuid(m.command_id, "command_id"),
                      m.command_type, _status(m.status), m.attempts, m.max_attempts,
                      m.correlation_id, m.reply_to or "", m.created_at, m.updated_at,
                      m.batch_id)  # fmt: skip
            for col, value in zip(cols, values, strict=True):
                col.append(value)
        if conn is not None:
            await self._insert(conn, metadata_list, cols)
            return
        async with (
            _db.bounded(self._pool),
            self._pool.connection() as acquired,
            acquired.transaction(),
        ):
            await self._insert(acquired, metadata_list, cols)

    async def _insert(
        self, conn: AsyncConnection[Any], metadata_list: list[CommandMetadata], cols: list[Any]
    ) -> None:
        rows = await _db.fetch_all(conn, "repo_command_insert", *cols, rows=dict)
        if len(rows) < len(metadata_list):
            inserted = {r["command_id"] for r in rows}
            seen: set[tuple[str, UUID]] = set()
            for m, cid in zip(metadata_list, cols[3], strict=True):
                if cid not in inserted or (m.domain, cid) in seen:
                    # Raising rolls back what was inserted (the caller's transaction with conn=).
                    raise DuplicateCommandError(m.domain, str(cid))
                seen.add((m.domain, cid))
            raise DuplicateCommandError(metadata_list[0].domain, "?")  # pragma: no cover
        logger.debug("saved %d command rows", len(rows))

    async def update_status(
        self,
        domain: str,
        command_id: UUID,
        status: CommandStatus,
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Set the command's status."""
        await _db.execute(
            conn or self._pool,
            "repo_command_update_status",
            domain,
            command_id,
            _status(status),
            domain=domain,
        )

    async def update_msg_id(
        self, domain: str, command_id: UUID, msg_id: int, conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Set the command's current PGMQ message ID."""
        await _db.execute(
            conn or self._pool,
            "repo_command_update_msg_id",
            domain,
            command_id,
            msg_id,
            domain=domain,
        )

    async def increment_attempts(
        self, domain: str, command_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> int:
        """Add one attempt; returns the new count (0 when the command does not exist)."""
        attempts = await _db.fetch_value(
            conn or self._pool, "repo_command_increment_attempts", domain, command_id, domain=domain
        )
        return 0 if attempts is None else int(attempts)

    async def receive_command(
        self,
        domain: str,
        command_id: UUID,
        new_status: CommandStatus = CommandStatus.IN_PROGRESS,
        conn: AsyncConnection[Any] | None = None,
    ) -> tuple[CommandMetadata, int] | None:
        """Add one attempt and set `new_status` unless the command is COMPLETED or CANCELED.

        Returns (metadata, attempts), or None when not found or terminal.
        """
        row = await _db.fetch_one(
            conn or self._pool,
            "repo_command_receive",
            domain,
            command_id,
            _status(new_status),
            rows=dict,
            domain=domain,
        )
        if row is None:
            return None
        metadata = metadata_from_row(row)
        return metadata, metadata.attempts

    async def update_error(
        self,
        domain: str,
        command_id: UUID,
        error_type: str,
        error_code: str,
        error_msg: str,
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Record the command's last error."""
        await _db.execute(
            conn or self._pool,
            "repo_command_update_error",
            domain,
            command_id,
            error_type,
            error_code,
            error_msg,
            domain=domain,
        )

    async def finish_command(
        self,
        domain: str,
        command_id: UUID,
        status: CommandStatus,
        error_type: str | None = None,
        error_code: str | None = None,
        error_msg: str | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Set status and (when given) the error fields in one statement."""
        await _db.execute(
            conn or self._pool,
            "repo_command_finish",
            domain,
            command_id,
            _status(status),
            error_type,
            error_code,
            error_msg,
            domain=domain,
        )

    # -- reading ---------------------------------------------------------------------------

    async def get(
        self, domain: str, command_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> CommandMetadata | None:
        """The command's metadata, or None."""
        row = await _db.fetch_one(
            conn or self._pool, "get_command", domain, command_id, rows=dict, domain=domain
        )
        return None if row is None else metadata_from_row(row)

    async def exists(
        self, domain: str, command_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """True when the command exists in the domain."""
        found = await _db.fetch_value(
            conn or self._pool, "command_exists", domain, command_id, domain=domain
        )
        return bool(found)

    async def exists_batch(
        self, domain: str, command_ids: list[UUID], conn: AsyncConnection[Any] | None = None
    ) -> set[UUID]:
        """The subset of `command_ids` that exist in the domain."""
        if not command_ids:
            return set()
        rows = await _db.fetch_all(
            conn or self._pool,
            "repo_command_existing",
            domain,
            list(command_ids),
            rows=dict,
            domain=domain,
        )
        return {r["command_id"] for r in rows}

    async def list_by_batch(
        self,
        domain: str,
        batch_id: UUID,
        *,
        status: CommandStatus | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CommandMetadata]:
        """The commands of a batch (optionally of one status), oldest first."""
        validate_page(limit, offset)
        status_text = None if status is None else _status(status)
        rows = await _db.fetch_all(
            self._pool,
            "batch_list_commands",
            domain,
            batch_id,
            status_text,
            limit,
            offset,
            rows=dict,
            domain=domain,
        )
        return [metadata_from_row(r) for r in rows]

    async def query(
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
        validate_page(limit, offset)
        status_text = None if status is None else _status(status)
        rows = await _db.fetch_all(
            self._pool,
            "query_commands",
            status_text, domain, command_type, created_after, created_before, limit, offset,
            rows=dict,
            domain=domain,
        )  # fmt: skip
        return [metadata_from_row(r) for r in rows]

    # -- the predecessor's stored-procedure calls ------------------------------------------

    async def sp_receive_command(
        self,
        domain: str,
        command_id: UUID,
        msg_id: int | None = None,
        max_attempts: int | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> tuple[CommandMetadata, int] | None:
        """`receive_command` plus its RECEIVED audit row and the start of its batch, in one
        statement. Returns (metadata, attempts), or None when not found or terminal."""
        row = await _db.fetch_one(
            conn or self._pool,
            "repo_sp_receive_command",
            domain, command_id, CommandStatus.IN_PROGRESS.value, msg_id, max_attempts,
            rows=dict,
            domain=domain,
        )  # fmt: skip
        if row is None:
            return None
        metadata = metadata_from_row(row)
        return metadata, metadata.attempts

    async def sp_finish_command(
        self,
        domain: str,
        command_id: UUID,
        status: CommandStatus,
        event_type: str,
        error_type: str | None = None,
        error_code: str | None = None,
        error_msg: str | None = None,
        details: dict[str, Any] | None = None,
        batch_id: UUID | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> bool:
        """Set status and errors, write an `event_type` audit row and move the counters of
        `batch_id` by the transition, in one statement (a command already in `status` only
        gets the audit row). Returns True when this completed the batch."""
        details_json = orjson.dumps(details).decode() if details else None
        batch_complete = await _db.fetch_value(
            conn or self._pool,
            "repo_sp_finish_command",
            domain, command_id, _status(status), str(event_type), error_type, error_code,
            error_msg, details_json, batch_id,
            domain=domain,
        )  # fmt: skip
        return bool(batch_complete)

    async def sp_fail_command(
        self,
        domain: str,
        command_id: UUID,
        error_type: str,
        error_code: str,
        error_msg: str,
        attempt: int,
        max_attempts: int,
        msg_id: int,
        conn: AsyncConnection[Any] | None = None,
    ) -> bool:
        """Record a failure and its FAILED audit row; False when the command does not exist."""
        found = await _db.fetch_value(
            conn or self._pool,
            "repo_sp_fail_command",
            domain, command_id, error_type, error_code, error_msg, attempt, max_attempts, msg_id,
            domain=domain,
        )  # fmt: skip
        return bool(found)


__all__ = ["CommandRepository", "PostgresCommandRepository", "metadata_from_row"]
