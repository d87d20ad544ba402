"""Command Bus domain models.

Names, fields, defaults and enum values match ``reliable-cmd`` 0.2.2. Default
timestamps are timezone-aware (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol
from uuid import UUID

from commandbus.exceptions import ValidationError

__all__ = [
    "AuditEvent",
    "BatchCommand",
    "BatchMetadata",
    "BatchSendResult",
    "BatchStatus",
    "Command",
    "CommandMetadata",
    "CommandStatus",
    "CreateBatchResult",
    "HandlerContext",
    "Reply",
    "ReplyOutcome",
    "SendRequest",
    "SendResult",
    "TroubleshootingItem",
    "VisibilityExtender",
]


def _utcnow() -> datetime:
    """Current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class CommandStatus(str, Enum):
    """Status of a command in its lifecycle."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    IN_TROUBLESHOOTING_QUEUE = "IN_TROUBLESHOOTING_QUEUE"


class ReplyOutcome(str, Enum):
    """Outcome of command processing, sent in replies."""

    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class BatchStatus(str, Enum):
    """Status of a batch in its lifecycle."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    COMPLETED_WITH_FAILURES = "COMPLETED_WITH_FAILURES"


@dataclass(frozen=True)
class Command:
    """A command to be processed by a handler.

    Attributes:
        domain: Domain the command belongs to (e.g. ``"payments"``).
        command_type: Type of command (e.g. ``"DebitAccount"``).
        command_id: Unique identifier of the command.
        data: The command payload.
        correlation_id: ID for tracing related commands.
        reply_to: Queue the reply is sent to.
        created_at: When the command was created (UTC).
    """

    domain: str
    command_type: str
    command_id: UUID
    data: dict[str, Any]
    correlation_id: UUID | None = None
    reply_to: str | None = None
    created_at: datetime = field(default_factory=_utcnow)


class VisibilityExtender(Protocol):
    """Something that can extend the visibility timeout of a message."""

    async def extend(self, seconds: int) -> None:
        """Extend the visibility timeout by ``seconds``."""
        ...


@dataclass
class HandlerContext:
    """Context passed to command handlers.

    Attributes:
        command: The command being processed.
        attempt: Current attempt number (1-based).
        max_attempts: Maximum attempts before the command is exhausted.
        msg_id: PGMQ message ID.
        visibility_extender: Used by :meth:`extend_visibility`.
    """

    command: Command
    attempt: int
    max_attempts: int
    msg_id: int
    visibility_extender: VisibilityExtender | None = None

    async def extend_visibility(self, seconds: int) -> None:
        """Extend the visibility timeout for a long-running handler.

        Raises:
            RuntimeError: If no visibility extender is available.
            ValidationError: If ``seconds`` is not a positive integer.
        """
        if self.visibility_extender is None:
            raise RuntimeError("Visibility extender not available")
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
            raise ValidationError("seconds", seconds, "must be a positive integer")
        await self.visibility_extender.extend(seconds)


@dataclass
class CommandMetadata:
    """Metadata stored for each command.

    Attributes:
        domain: Domain the command belongs to.
        command_id: Unique identifier.
        command_type: Type of command.
        status: Current status.
        attempts: Number of processing attempts so far.
        max_attempts: Maximum allowed attempts.
        msg_id: Current PGMQ message ID.
        correlation_id: Correlation ID for tracing.
        reply_to: Reply queue.
        last_error_type: Type of the last error (TRANSIENT/PERMANENT/...).
        last_error_code: Application error code of the last error.
        last_error_msg: Message of the last error.
        created_at: Creation timestamp.
        updated_at: Last update timestamp.
        batch_id: Batch the command belongs to, if any.
        result: Handler result stored on completion, if any.
    """

    domain: str
    command_id: UUID
    command_type: str
    status: CommandStatus
    attempts: int = 0
    max_attempts: int = 3
    msg_id: int | None = None
    correlation_id: UUID | None = None
    reply_to: str | None = None
    last_error_type: str | None = None
    last_error_code: str | None = None
    last_error_msg: str | None = None
    created_at: datetime = field(default_factory=_utcnow)
    updated_at: datetime = field(default_factory=_utcnow)
    batch_id: UUID | None = None
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reply:
    """Reply message sent after command processing.

    Attributes:
        command_id: ID of the command being replied to.
        correlation_id: Correlation ID from the command.
        outcome: SUCCESS, FAILED or CANCELED.
        data: Optional result data.
        error_code: Error code if failed.
        error_message: Error message if failed.
    """

    command_id: UUID
    correlation_id: UUID | None
    outcome: ReplyOutcome
    data: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass
class TroubleshootingItem:
    """A command in the troubleshooting queue awaiting operator action.

    ``payload`` is the original command message taken from the PGMQ archive.
    """

    domain: str
    command_id: UUID
    command_type: str
    attempts: int
    max_attempts: int
    last_error_type: str | None
    last_error_code: str | None
    last_error_msg: str | None
    correlation_id: UUID | None
    reply_to: str | None
    payload: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AuditEvent:
    """An audit event in a command's lifecycle (SENT, RECEIVED, FAILED, ...)."""

    audit_id: int
    domain: str
    command_id: UUID
    event_type: str
    timestamp: datetime
    details: dict[str, Any] | None = None


@dataclass
class SendRequest:
    """Request to send one command as part of ``send_batch``.

    ``max_attempts=None`` uses the bus default; ``batch_id`` attaches the
    command to an existing batch.
    """

    domain: str
    command_type: str
    command_id: UUID
    data: dict[str, Any]
    correlation_id: UUID | None = None
    reply_to: str | None = None
    max_attempts: int | None = None
    batch_id: UUID | None = None


@dataclass
class SendResult:
    """Result of sending a command: its ID and the PGMQ message ID."""

    command_id: UUID
    msg_id: int


@dataclass
class BatchSendResult:
    """Result of a ``send_batch`` operation.

    Attributes:
        results: One result per command sent.
        chunks_processed: Number of transaction chunks processed.
        total_commands: Total number of commands sent.
    """

    results: list[SendResult]
    chunks_processed: int
    total_commands: int


@dataclass(frozen=True)
class BatchCommand:
    """A command to be included in a batch created with ``create_batch``."""

    command_type: str
    command_id: UUID
    data: dict[str, Any]
    correlation_id: UUID | None = None
    reply_to: str | None = None
    max_attempts: int | None = None


@dataclass
class BatchMetadata:
    """Metadata stored for a batch of commands or processes.

    Attributes:
        domain: Domain the batch belongs to.
        batch_id: Unique identifier.
        batch_type: ``"COMMAND"`` or ``"PROCESS"``.
        status: Current batch status.
        name: Optional human-readable name.
        custom_data: Optional custom metadata.
        total_count: Number of items in the batch.
        completed_count: Items completed successfully.
        failed_count: Items failed by business rule violations.
        canceled_count: Items canceled (TSQ resolution or process failure).
        in_troubleshooting_count: Items currently in the troubleshooting queue.
        created_at: Creation timestamp.
        started_at: When the first item was processed.
        completed_at: When all items reached a terminal state.
    """

    domain: str
    batch_id: UUID
    batch_type: str = "COMMAND"
    status: BatchStatus = BatchStatus.PENDING
    name: str | None = None
    custom_data: dict[str, Any] | None = None
    total_count: int = 0
    completed_count: int = 0
    failed_count: int = 0
    canceled_count: int = 0
    in_troubleshooting_count: int = 0
    created_at: datetime = field(default_factory=_utcnow)
    started_at: datetime | None = None
    completed_at: datetime | None = None

    @property
    def waiting_for_operator(self) -> bool:
        """True when every command of the batch that is not finished waits in the
        troubleshooting queue: the batch cannot complete (nor run ``on_complete``) until an
        operator retries, completes or cancels them. A command in the TSQ is not finished; the
        status stays ``IN_PROGRESS`` meanwhile. ``list_batches(..., waiting_for_operator=True)``
        finds these batches."""
        remaining = self.total_count - self.completed_count - self.failed_count
        remaining -= self.canceled_count
        return self.in_troubleshooting_count > 0 and self.in_troubleshooting_count >= remaining


@dataclass
class CreateBatchResult:
    """Result of creating a batch: its ID and one result per command."""

    batch_id: UUID
    command_results: list[SendResult]
    total_commands: int
