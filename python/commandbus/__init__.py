"""rcmd: reliable commands for Python services, a command bus over PostgreSQL + PGMQ whose hot
path is Rust. Drop-in successor of `reliable-cmd` 0.2.2 (same names, same database objects)."""

import importlib
from typing import TYPE_CHECKING, Any

from commandbus import _native
from commandbus.batch import (
    BatchCompletionCallback,
    check_and_invoke_batch_callback,
    clear_all_callbacks,
    get_batch_callback,
    register_batch_callback,
    remove_batch_callback,
)
from commandbus.bus import CommandBus
from commandbus.exceptions import (
    BatchNotFoundError,
    BusinessRuleException,
    CommandBusError,
    CommandNotFoundError,
    DatabaseError,
    DuplicateBatchError,
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
from commandbus.ids import uuid7
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
    Reply,
    ReplyOutcome,
    SendRequest,
    SendResult,
    TroubleshootingItem,
)
from commandbus.ops.troubleshooting import TroubleshootingQueue
from commandbus.pgmq.client import PgmqClient, PgmqMessage
from commandbus.policies import DEFAULT_RETRY_POLICY, RetryPolicy
from commandbus.replies import ReplyConsumer, wait_for_reply
from commandbus.repositories import (
    AuditEventType,
    PostgresAuditLogger,
    PostgresBatchRepository,
    PostgresCommandRepository,
)
from commandbus.retention import PruneResult, RetentionPolicy
from commandbus.setup import check_schema_exists, get_schema_sql, setup_database
from commandbus.worker import ReceivedCommand, Worker

if TYPE_CHECKING:
    from commandbus.sync import SyncCommandBus, SyncProcessReplyRouter, SyncWorker

#: The predecessor exports its sync classes here too; they load on first use, so that
#: `import commandbus` does not pay for the sync API (and the process managers) it may not use.
_LAZY = {
    "SyncCommandBus": "commandbus.sync",
    "SyncProcessReplyRouter": "commandbus.sync",
    "SyncWorker": "commandbus.sync",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'commandbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


# The version is written once, in Cargo.toml ([workspace.package]): the native module is built
# with it (CARGO_PKG_VERSION) and maturin writes it into the distribution's metadata.
__version__: str = _native.__version__

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "AuditEvent",
    "AuditEventType",
    "BatchCommand",
    "BatchCompletionCallback",
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
    "DuplicateBatchError",
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
    "PgmqClient",
    "PgmqMessage",
    "PostgresAuditLogger",
    "PostgresBatchRepository",
    "PostgresCommandRepository",
    "PruneResult",
    "ReceivedCommand",
    "Reply",
    "ReplyConsumer",
    "ReplyOutcome",
    "RetentionPolicy",
    "RetryPolicy",
    "SchemaNotInstalledError",
    "SendRequest",
    "SendResult",
    "SerializationError",
    "SyncCommandBus",
    "SyncProcessReplyRouter",
    "SyncWorker",
    "TransientCommandError",
    "TroubleshootingItem",
    "TroubleshootingQueue",
    "ValidationError",
    "Worker",
    "WorkerStoppedError",
    "__version__",
    "check_and_invoke_batch_callback",
    "check_schema_exists",
    "clear_all_callbacks",
    "get_batch_callback",
    "get_schema_sql",
    "handler",
    "register_batch_callback",
    "remove_batch_callback",
    "setup_database",
    "uuid7",
    "wait_for_reply",
]
