"""Process persistence: `ProcessRepository` (the protocol a process manager needs) and its
PostgreSQL implementation over the statements of `sql/statements/process.sql`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus._validation import check_json
from commandbus.models import ReplyOutcome
from commandbus.process.models import ProcessAuditEntry, ProcessMetadata, ProcessStatus

logger = logging.getLogger(__name__)


class ProcessRepository(Protocol):
    """What a process manager and the reply router need to persist processes. Every method
    takes an optional `conn` (the caller's transaction)."""

    async def save(
        self, process: ProcessMetadata[Any, Any], conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Save a new process."""
        ...

    async def update(
        self, process: ProcessMetadata[Any, Any], conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Update an existing process."""
        ...

    async def get_by_id(
        self, domain: str, process_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> ProcessMetadata[Any, Any] | None:
        """Get a process by id (None when unknown)."""
        ...

    async def find_by_status(
        self,
        domain: str,
        statuses: list[ProcessStatus],
        conn: AsyncConnection[Any] | None = None,
    ) -> list[ProcessMetadata[Any, Any]]:
        """Find a domain's processes in any of `statuses`."""
        ...

    async def log_step(
        self,
        domain: str,
        process_id: UUID,
        entry: ProcessAuditEntry,
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Record a step (a command sent) in the process audit trail."""
        ...

    async def update_step_reply(
        self,
        domain: str,
        process_id: UUID,
        command_id: UUID,
        entry: ProcessAuditEntry,
        conn: AsyncConnection[Any] | None = None,
    ) -> bool | None:
        """Record a step's reply. An implementation that returns False says the step already
        had its reply (a duplicate delivery): the process manager then does nothing else."""
        ...

    async def get_audit_trail(
        self, domain: str, process_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> list[ProcessAuditEntry]:
        """The process's steps in the order they were sent."""
        ...

    async def get_completed_steps(
        self, domain: str, process_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> list[str]:
        """Names of the steps whose reply was SUCCESS, in the order they were sent."""
        ...


def _state_json(state: Any) -> Any:
    to_dict = getattr(state, "to_dict", None)
    return to_dict() if callable(to_dict) else state


def _state_jsonb(state: Any) -> Jsonb:
    """The process state as a JSONB parameter, checked first (a NaN, a NUL or a lone
    surrogate is a SerializationError naming its path under `state`, before any write)."""
    obj = _state_json(state)
    text = check_json(obj, "state").decode()
    return Jsonb(obj, dumps=lambda _obj: text)


def _text(value: Any) -> str | None:
    """A step (StrEnum) or status as the text stored."""
    if value is None:
        return None
    return str(value.value) if hasattr(value, "value") else str(value)


def _process_from_row(row: Sequence[Any]) -> ProcessMetadata[Any, Any]:
    return ProcessMetadata(
        domain=row[0],
        process_id=row[1],
        process_type=row[2],
        status=ProcessStatus(row[3]),
        current_step=row[4],
        state=row[5],
        error_code=row[6],
        error_message=row[7],
        created_at=row[8],
        updated_at=row[9],
        completed_at=row[10],
        batch_id=row[11],
    )


def _entry_from_row(row: Sequence[Any]) -> ProcessAuditEntry:
    return ProcessAuditEntry(
        step_name=row[0],
        command_id=row[1],
        command_type=row[2],
        command_data=row[3],
        sent_at=row[4],
        reply_outcome=ReplyOutcome(row[5]) if row[5] else None,
        reply_data=row[6],
        received_at=row[7],
    )


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


class PostgresProcessRepository:
    """`ProcessRepository` on `commandbus.process` and `commandbus.process_audit`, writing the
    rows the predecessor writes. Without `conn` a connection of the pool is used (committed)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    def _target(self, conn: AsyncConnection[Any] | None) -> _db.Target:
        return conn if conn is not None else self._pool

    async def save(
        self, process: ProcessMetadata[Any, Any], conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Insert the process row as given."""
        await _db.execute(
            self._target(conn),
            "process_insert",
            process.domain, process.process_id, process.process_type,
            ProcessStatus(process.status).value, _text(process.current_step),
            _state_jsonb(process.state), process.error_code, process.error_message,
            process.created_at, process.updated_at, process.completed_at, process.batch_id,
            domain=process.domain,
        )  # fmt: skip
        logger.debug("saved process %s.%s", process.domain, process.process_id)

    async def update(
        self, process: ProcessMetadata[Any, Any], conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Update status, step, state, error and completed_at (updated_at = now())."""
        await _db.execute(
            self._target(conn),
            "process_update",
            process.domain, process.process_id, ProcessStatus(process.status).value,
            _text(process.current_step), _state_jsonb(process.state), process.error_code,
            process.error_message, process.completed_at,
            domain=process.domain,
        )  # fmt: skip

    async def get_by_id(
        self, domain: str, process_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> ProcessMetadata[Any, Any] | None:
        """The process (state as a dict), or None."""
        row = await _db.fetch_one(
            self._target(conn), "process_get", domain, process_id, domain=domain
        )
        return None if row is None else _process_from_row(row)

    async def find_by_status(
        self,
        domain: str,
        statuses: list[ProcessStatus],
        conn: AsyncConnection[Any] | None = None,
    ) -> list[ProcessMetadata[Any, Any]]:
        """The domain's processes in any of `statuses`, oldest first."""
        rows = await _db.fetch_all(
            self._target(conn),
            "process_find_by_status",
            domain,
            [ProcessStatus(s).value for s in statuses],
            domain=domain,
        )
        return [_process_from_row(r) for r in rows]

    async def log_step(
        self,
        domain: str,
        process_id: UUID,
        entry: ProcessAuditEntry,
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Insert the step's process_audit row."""
        await _db.execute(
            self._target(conn),
            "process_audit_insert",
            domain, process_id, entry.step_name, entry.command_id, entry.command_type,
            _jsonb(entry.command_data), entry.sent_at,
            None if entry.reply_outcome is None else ReplyOutcome(entry.reply_outcome).value,
            _jsonb(entry.reply_data), entry.received_at,
            domain=domain,
        )  # fmt: skip

    async def update_step_reply(
        self,
        domain: str,
        process_id: UUID,
        command_id: UUID,
        entry: ProcessAuditEntry,
        conn: AsyncConnection[Any] | None = None,
    ) -> bool:
        """Record the reply of the step that sent `command_id`, once: returns False (and
        changes nothing) when that step already has its reply, or there is no such step."""
        rows = await _db.fetch_all(
            self._target(conn),
            "process_audit_reply",
            domain, process_id, command_id,
            None if entry.reply_outcome is None else ReplyOutcome(entry.reply_outcome).value,
            _jsonb(entry.reply_data), entry.received_at,
            domain=domain,
        )  # fmt: skip
        return bool(rows)

    async def get_audit_trail(
        self, domain: str, process_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> list[ProcessAuditEntry]:
        """The process's steps in the order they were sent."""
        rows = await _db.fetch_all(
            self._target(conn), "process_audit_list", domain, process_id, domain=domain
        )
        return [_entry_from_row(r) for r in rows]

    async def get_completed_steps(
        self, domain: str, process_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> list[str]:
        """Names of the steps whose reply was SUCCESS, in the order they were sent."""
        rows = await _db.fetch_all(
            self._target(conn), "process_completed_steps", domain, process_id, domain=domain
        )
        return [r[0] for r in rows]

    async def sync_troubleshooting(
        self,
        domain: str,
        command_ids: Sequence[UUID] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> int:
        """Put the domain's processes whose pending step's command is in the troubleshooting
        queue into WAITING_FOR_TSQ, and those whose command left it without a reply (operator
        retry) back to waiting; returns how many changed (`process_tsq_sync_v1`)."""
        changed = await _db.fetch_value(
            self._target(conn),
            "process_tsq_sync",
            domain,
            None if command_ids is None else list(command_ids),
            domain=domain,
        )
        return int(changed or 0)


__all__ = ["PostgresProcessRepository", "ProcessRepository"]
