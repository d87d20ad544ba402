"""Repository implementations (the predecessor's `commandbus.repositories`)."""

from commandbus.repositories.audit import AuditEventType, PostgresAuditLogger
from commandbus.repositories.batch import PostgresBatchRepository
from commandbus.repositories.command import PostgresCommandRepository

__all__ = [
    "AuditEventType",
    "PostgresAuditLogger",
    "PostgresBatchRepository",
    "PostgresCommandRepository",
]
