"""rcmd: reliable commands for Python services, a command bus over PostgreSQL + PGMQ whose hot
path is Rust. Drop-in successor of `reliable-cmd` 0.2.2 (same names, same database objects)."""

from commandbus.bus import CommandBus
from commandbus.exceptions import (
    BatchNotFoundError,
    BusinessRuleException,
    CommandBusError,
    CommandNotFoundError,
    DatabaseError,
    DuplicateCommandError,
    HandlerAlreadyRegisteredError,
    HandlerNotFoundError,
    InvalidNameError,
    InvalidOperationError,
    PayloadTooLargeError,
    PermanentCommandError,
    SchemaNotInstalledError,
    SerializationError,
    TransientCommandError,
    ValidationError,
    WorkerStoppedError,
)
from commandbus.handler import HandlerMeta, HandlerRegistry, handler
from commandbus.models import (
    AuditEvent,
    BatchCommand,
    BatchMetadata,
    BatchSendResult,
    BatchStatus,
    Command,
    CommandMetadata,
    CommandStatus,
    CreateBatchResult,
    HandlerContext,
    ReplyOutcome,
    SendRequest,
    SendResult,
    TroubleshootingItem,
)
from commandbus.policies import DEFAULT_RETRY_POLICY, RetryPolicy
from commandbus.setup import check_schema_exists, get_schema_sql, setup_database
from commandbus.worker import ReceivedCommand, Worker

try:
    from importlib.metadata import version as _version

    __version__ = _version("reliable-commands")
except Exception:  # pragma: no cover - not installed (source tree)
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "AuditEvent",
    "BatchCommand",
    "BatchMetadata",
    "BatchNotFoundError",
    "BatchSendResult",
    "BatchStatus",
    "BusinessRuleException",
    "Command",
    "CommandBus",
    "CommandBusError",
    "CommandMetadata",
    "CommandNotFoundError",
    "CommandStatus",
    "CreateBatchResult",
    "DatabaseError",
    "DuplicateCommandError",
    "HandlerAlreadyRegisteredError",
    "HandlerContext",
    "HandlerMeta",
    "HandlerNotFoundError",
    "HandlerRegistry",
    "InvalidNameError",
    "InvalidOperationError",
    "PayloadTooLargeError",
    "PermanentCommandError",
    "ReceivedCommand",
    "ReplyOutcome",
    "RetryPolicy",
    "SchemaNotInstalledError",
    "SendRequest",
    "SendResult",
    "SerializationError",
    "TransientCommandError",
    "TroubleshootingItem",
    "ValidationError",
    "Worker",
    "WorkerStoppedError",
    "__version__",
    "check_schema_exists",
    "get_schema_sql",
    "handler",
    "setup_database",
]
