"""Process manager models: the predecessor's names, fields and values."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any, Generic, Protocol, Self, TypeVar
from uuid import UUID

from commandbus.models import Reply, ReplyOutcome


class ProcessStatus(str, Enum):
    """Status of a process instance (the value is what `process.status` holds).

    PENDING (saved, first step not sent yet) -> WAITING (a step's command sent, its reply
    awaited; the predecessor's member name for it is WAITING_FOR_REPLY) -> ... -> COMPLETED.
    A step whose command sits in the troubleshooting queue: WAITING_FOR_TSQ until an operator
    acts. A step that failed (FAILED or CANCELED reply): COMPENSATING while the compensations of
    the completed steps run, newest first, then COMPENSATED; FAILED when a compensation itself
    failed. IN_PROGRESS and CANCELED are kept from the predecessor (never set by this package).
    """

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    WAITING_FOR_REPLY = "WAITING"
    WAITING = "WAITING"  # an alias of WAITING_FOR_REPLY
    WAITING_FOR_TSQ = "WAITING_FOR_TSQ"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


#: Statuses after which a process never moves again.
TERMINAL_STATUSES = frozenset(
    {
        ProcessStatus.COMPLETED,
        ProcessStatus.COMPENSATED,
        ProcessStatus.FAILED,
        ProcessStatus.CANCELED,
    }
)


class ProcessState(Protocol):
    """Typed process state: serialized with `to_dict()` into `process.state` (JSONB) and read
    back with `from_dict()`."""

    def to_dict(self) -> dict[str, Any]:
        """Serialize state to a JSON-compatible dict."""
        ...

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Deserialize state from a JSON-compatible dict."""
        ...


TState = TypeVar("TState", bound=ProcessState)
TStep = TypeVar("TStep", bound=StrEnum)


@dataclass
class ProcessMetadata(Generic[TState, TStep]):
    """A process instance: one `commandbus.process` row.

    `state` is the typed state (a dict when read by the repository, before the process
    manager converts it); `current_step` the step whose command was sent last (a str when read
    back from the database: compare it with your StrEnum members, which are equal to it).
    """

    domain: str
    process_id: UUID
    process_type: str
    state: TState
    status: ProcessStatus = ProcessStatus.PENDING
    current_step: TStep | None = None

    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    completed_at: datetime | None = None

    error_code: str | None = None
    error_message: str | None = None

    #: Links the process to a process batch (batch_type PROCESS) counted by its status.
    batch_id: UUID | None = None


@dataclass
class ProcessAuditEntry:
    """One step of a process: one `commandbus.process_audit` row (the command sent, and its
    reply once it came)."""

    step_name: str
    command_id: UUID
    command_type: str
    command_data: dict[str, Any] | None
    sent_at: datetime
    reply_outcome: ReplyOutcome | None = None
    reply_data: dict[str, Any] | None = None
    received_at: datetime | None = None


TData = TypeVar("TData")


@dataclass(frozen=True)
class ProcessCommand(Generic[TData]):
    """The command a step sends: its type and typed data (`data.to_dict()` when it has one)."""

    command_type: str
    data: TData

    def to_dict(self) -> dict[str, Any]:
        """Convert to a dictionary for serialization."""
        to_dict = getattr(self.data, "to_dict", None)
        return {
            "command_type": self.command_type,
            "data": to_dict() if callable(to_dict) else self.data,
        }


TResult = TypeVar("TResult")


@dataclass(frozen=True)
class ProcessResponse(Generic[TResult]):
    """A reply with its result converted to a typed value (`result_type.from_dict` when it has
    one, else the dict as is)."""

    outcome: ReplyOutcome
    result: TResult | None
    error_code: str | None
    error_message: str | None

    @classmethod
    def from_reply(cls, reply: Reply, result_type: type[TResult]) -> ProcessResponse[TResult]:
        """Create from a Reply."""
        result: Any = None
        if reply.data is not None:
            from_dict = getattr(result_type, "from_dict", None)
            result = from_dict(reply.data) if callable(from_dict) else reply.data
        return cls(
            outcome=reply.outcome,
            result=result,
            error_code=reply.error_code,
            error_message=reply.error_message,
        )


__all__ = [
    "TERMINAL_STATUSES",
    "ProcessAuditEntry",
    "ProcessCommand",
    "ProcessMetadata",
    "ProcessResponse",
    "ProcessState",
    "ProcessStatus",
    "TData",
    "TResult",
    "TState",
    "TStep",
]
