"""Command metadata repository: the predecessor's `PostgresCommandRepository` over our schema.

The bus and the worker do not use it (they call the protocol functions of V002 in batches);
it serves code written against `reliable-cmd` that reads or edits command rows directly.
Its writes are plain row updates: they are not fenced by a lease like the worker's outcomes.
The predecessor's `sp_*` methods keep their meaning as single statements
(`repo_sp_*.sql`); batch counters move through `apply_batch_delta_v1` (V003).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import orjson
import psycopg
from psycopg import AsyncConnection, AsyncRawCursor
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from commandbus import _sql
from commandbus._errors import map_psycopg_error
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
    """A `CommandMetadata` from a row with the columns of `get_command.sql`, read by name."""
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

    async def _run(
        self,
        name: str,
        params: Sequence[Any],
        conn: AsyncConnection[Any] | None = None,
        domain: str | None = None,
    ) -> list[Row]:
        try:
            if conn is not None:
                return await _fetch(conn, name, params)
            async with self._pool.connection() as acquired:
                return await _fetch(acquired, name, params)
        except psycopg.Error as err:
            raise map_psycopg_error(err, domain) from err

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
        async with self._pool.connection() as acquired, acquired.transaction():
            await self._insert(acquired, metadata_list, cols)

    async def _insert(
        self, conn: AsyncConnection[Any], metadata_list: list[CommandMetadata], cols: list[Any]
    ) -> None:
        rows = await self._run("repo_command_insert", cols, conn)
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
        await self._run(
            "repo_command_update_status", [domain, command_id, _status(status)], conn, domain
        )

    async def update_msg_id(
        self, domain: str, command_id: UUID, msg_id: int, conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Set the command's current PGMQ message ID."""
        await self._run("repo_command_update_msg_id", [domain, command_id, msg_id], conn, domain)

    async def increment_attempts(
        self, domain: str, command_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> int:
        """Add one attempt; returns the new count (0 when the command does not exist)."""
        rows = await self._run(
            "repo_command_increment_attempts", [domain, command_id], conn, domain
        )
        return int(rows[0]["attempts"]) if rows else 0

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
        rows = await self._run(
            "repo_command_receive", [domain, command_id, _status(new_status)], conn, domain
        )
        if not rows:
            return None
        metadata = metadata_from_row(rows[0])
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
        await self._run(
            "repo_command_update_error",
            [domain, command_id, error_type, error_code, error_msg],
            conn,
            domain,
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
        await self._run(
            "repo_command_finish",
            [domain, command_id, _status(status), error_type, error_code, error_msg],
            conn,
            domain,
        )

    # -- reading ---------------------------------------------------------------------------

    async def get(
        self, domain: str, command_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> CommandMetadata | None:
        """The command's metadata, or None."""
        rows = await self._run("get_command", [domain, command_id], conn, domain)
        return metadata_from_row(rows[0]) if rows else None

    async def exists(
        self, domain: str, command_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """True when the command exists in the domain."""
        rows = await self._run("command_exists", [domain, command_id], conn, domain)
        return bool(rows and rows[0]["found"])

    async def exists_batch(
        self, domain: str, command_ids: list[UUID], conn: AsyncConnection[Any] | None = None
    ) -> set[UUID]:
        """The subset of `command_ids` that exist in the domain."""
        if not command_ids:
            return set()
        rows = await self._run("repo_command_existing", [domain, list(command_ids)], conn, domain)
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
        rows = await self._run(
            "batch_list_commands", [domain, batch_id, status_text, limit, offset], None, domain
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
        params = [status_text, domain, command_type, created_after, created_before, limit, offset]
        rows = await self._run("query_commands", params, None, domain)
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
        params = [domain, command_id, CommandStatus.IN_PROGRESS.value, msg_id, max_attempts]
        rows = await self._run("repo_sp_receive_command", params, conn, domain)
        if not rows:
            return None
        metadata = metadata_from_row(rows[0])
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
        params = [domain, command_id, _status(status), str(event_type), error_type, error_code,
                  error_msg, details_json, batch_id]  # fmt: skip
        rows = await self._run("repo_sp_finish_command", params, conn, domain)
        return bool(rows and rows[0]["batch_complete"])

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
        params = [domain, command_id, error_type, error_code, error_msg, attempt, max_attempts,
                  msg_id]  # fmt: skip
        rows = await self._run("repo_sp_fail_command", params, conn, domain)
        return bool(rows and rows[0]["found"])


async def _fetch(conn: AsyncConnection[Any], name: str, params: Sequence[Any]) -> list[Row]:
    async with AsyncRawCursor(conn, row_factory=dict_row) as cur:
        await cur.execute(_sql.statement(name), params)
        return await cur.fetchall() if cur.description is not None else []


__all__ = ["CommandRepository", "PostgresCommandRepository", "metadata_from_row"]
