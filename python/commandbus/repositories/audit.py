"""Audit log: the predecessor's `PostgresAuditLogger` and `AuditEventType`.

The protocol functions write the audit rows of the hot path themselves; this logger
is for code that records its own events (it writes the same table and keys).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from typing import Any, Protocol
from uuid import UUID

import orjson
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus._validation import validate_uuid
from commandbus.models import AuditEvent

logger = logging.getLogger(__name__)


class AuditEventType(str, Enum):
    """Types of audit events (the predecessor's, and those rcmd adds)."""

    SENT = "SENT"
    RECEIVED = "RECEIVED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    RETRY_SCHEDULED = "RETRY_SCHEDULED"
    RETRY_EXHAUSTED = "RETRY_EXHAUSTED"
    MOVED_TO_TSQ = "MOVED_TO_TSQ"
    BUSINESS_RULE_FAILED = "BUSINESS_RULE_FAILED"
    OPERATOR_RETRY = "OPERATOR_RETRY"
    OPERATOR_CANCEL = "OPERATOR_CANCEL"
    OPERATOR_COMPLETE = "OPERATOR_COMPLETE"
    # rcmd: an unstarted lease given back at graceful stop (release_commands_v1).
    RELEASED = "RELEASED"
    # rcmd: batch transitions, recorded with the batch_id in the command_id column.
    BATCH_STARTED = "BATCH_STARTED"
    BATCH_COMPLETED = "BATCH_COMPLETED"


AuditRecord = tuple[str, UUID, AuditEventType | str, dict[str, Any] | None]


class AuditLogger(Protocol):
    """Protocol for audit logging."""

    async def log(
        self,
        domain: str,
        command_id: UUID,
        event_type: AuditEventType,
        details: dict[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> None: ...


def _details(details: dict[str, Any] | None) -> str | None:
    return orjson.dumps(details, default=str).decode() if details else None


def _event(value: AuditEventType | str) -> str:
    return value.value if isinstance(value, AuditEventType) else str(value)


class PostgresAuditLogger:
    """PostgreSQL implementation of `AuditLogger`."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        """Args:
        pool: the psycopg async pool used when no `conn=` is given.
        """
        self._pool = pool

    async def log(
        self,
        domain: str,
        command_id: UUID,
        event_type: AuditEventType,
        details: dict[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Write one audit row (in the caller's transaction with `conn=`)."""
        await self.log_batch([(domain, command_id, event_type, details)], conn)

    async def log_batch(
        self, events: Sequence[AuditRecord], conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Write many audit rows in one statement: (domain, command_id, event_type, details)."""
        if not events:
            return
        await _db.execute(
            conn or self._pool,
            "repo_audit_insert",
            [e[0] for e in events],
            [validate_uuid(e[1], "command_id") for e in events],
            [_event(e[2]) for e in events],
            [_details(e[3]) for e in events],
        )
        logger.debug("logged %d audit events", len(events))

    async def get_events(self, command_id: UUID, domain: str | None = None) -> list[AuditEvent]:
        """The command's audit events, oldest first (empty when unknown)."""
        rows = await _db.fetch_all(
            self._pool, "audit_trail", validate_uuid(command_id, "command_id"), domain, rows=dict
        )
        return [
            AuditEvent(
                audit_id=r["audit_id"],
                domain=r["domain"],
                command_id=r["command_id"],
                event_type=r["event_type"],
                timestamp=r["ts"],
                details=r["details_json"] or None,
            )
            for r in rows
        ]


__all__ = ["AuditEventType", "AuditLogger", "AuditRecord", "PostgresAuditLogger"]
