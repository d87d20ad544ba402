"""Process managers: sagas over commands, with typed state and steps, compensation and
exactly-once advancement (see `BaseProcessManager` and `ProcessReplyRouter`)."""

from commandbus.process.base import BaseProcessManager
from commandbus.process.models import (
    ProcessAuditEntry,
    ProcessCommand,
    ProcessMetadata,
    ProcessResponse,
    ProcessState,
    ProcessStatus,
)
from commandbus.process.repository import PostgresProcessRepository, ProcessRepository
from commandbus.process.router import ProcessReplyRouter

__all__ = [
    "BaseProcessManager",
    "PostgresProcessRepository",
    "ProcessAuditEntry",
    "ProcessCommand",
    "ProcessMetadata",
    "ProcessReplyRouter",
    "ProcessRepository",
    "ProcessResponse",
    "ProcessState",
    "ProcessStatus",
]
