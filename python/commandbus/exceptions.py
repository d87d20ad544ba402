"""Command Bus exceptions.

Every exception raised by ``commandbus`` derives from :class:`CommandBusError`.
The classes inherited from ``reliable-cmd`` keep their constructor signatures,
attributes and messages. The exceptions are picklable, so they can cross
process boundaries.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BatchNotFoundError",
    "BusinessRuleException",
    "CommandBusError",
    "CommandNotFoundError",
    "DatabaseError",
    "DuplicateBatchError",
    "DuplicateCommandError",
    "HandlerAlreadyRegisteredError",
    "HandlerNotFoundError",
    "InvalidNameError",
    "InvalidOperationError",
    "PayloadTooLargeError",
    "PermanentCommandError",
    "PostgresError",
    "SchemaNotInstalledError",
    "SerializationError",
    "TransientCommandError",
    "ValidationError",
    "WorkerStoppedError",
]

_MAX_REPR_CHARS = 200


class CommandBusError(Exception):
    """Base exception for all Command Bus errors."""

    def _remember_args(self, owner: type[CommandBusError], *args: object) -> None:
        """Record the constructor arguments so that pickling works."""
        self._ctor_owner = owner
        self._ctor_args = args

    def __reduce__(self) -> Any:
        owner = self.__dict__.get("_ctor_owner")
        # Only replay the recorded arguments when the concrete class still uses
        # the recording constructor (a subclass may define another signature).
        if owner is not None and type(self).__init__ is owner.__init__:
            return (type(self), self._ctor_args, self.__dict__)
        return super().__reduce__()


class HandlerAlreadyRegisteredError(CommandBusError):
    """Raised when a handler is already registered for a command type."""

    def __init__(self, domain: str, command_type: str) -> None:
        self.domain = domain
        self.command_type = command_type
        self._remember_args(HandlerAlreadyRegisteredError, domain, command_type)
        super().__init__(f"Handler already registered for {domain}.{command_type}")


class HandlerNotFoundError(CommandBusError):
    """Raised when no handler is registered for a command type."""

    def __init__(self, domain: str, command_type: str) -> None:
        self.domain = domain
        self.command_type = command_type
        self._remember_args(HandlerNotFoundError, domain, command_type)
        super().__init__(f"No handler registered for {domain}.{command_type}")


class DuplicateCommandError(CommandBusError):
    """Raised when sending a command whose command_id already exists."""

    def __init__(self, domain: str, command_id: str) -> None:
        self.domain = domain
        self.command_id = command_id
        self._remember_args(DuplicateCommandError, domain, command_id)
        super().__init__(f"Duplicate command_id {command_id} in domain {domain}")


class _CodedError(CommandBusError):
    """Shared implementation of the handler-raised errors (code + message)."""

    def __init__(
        self,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.code = code
        self.error_message = message
        self.details = details or {}
        self._remember_args(_CodedError, code, message, details)
        super().__init__(f"[{code}] {message}")


class TransientCommandError(_CodedError):
    """Retryable failure (network, timeout, temporary unavailability).

    The command is retried with backoff; once attempts are exhausted it moves
    to the troubleshooting queue.
    """


class PermanentCommandError(_CodedError):
    """Non-retryable failure: the command goes to the troubleshooting queue."""


class BusinessRuleException(_CodedError):
    """Business rule violation that fails the command immediately.

    Bypasses the troubleshooting queue, sets the command status to FAILED and
    triggers compensation for process-managed commands.
    """


class CommandNotFoundError(CommandBusError):
    """Raised when a command does not exist."""

    def __init__(self, domain: str, command_id: str) -> None:
        self.domain = domain
        self.command_id = command_id
        self._remember_args(CommandNotFoundError, domain, command_id)
        super().__init__(f"Command {command_id} not found in domain {domain}")


class InvalidOperationError(CommandBusError):
    """Raised when an operation is invalid for the current command state."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class BatchNotFoundError(CommandBusError):
    """Raised when a batch does not exist."""

    def __init__(self, domain: str, batch_id: str) -> None:
        self.domain = domain
        self.batch_id = batch_id
        self._remember_args(BatchNotFoundError, domain, batch_id)
        super().__init__(f"Batch {batch_id} not found in domain {domain}")


def _short_repr(value: object) -> str:
    """Return ``repr(value)`` truncated to at most 200 characters."""
    try:
        text = repr(value)
    except Exception:
        text = f"<unrepresentable {type(value).__name__}>"
    if len(text) > _MAX_REPR_CHARS:
        text = text[: _MAX_REPR_CHARS - 3] + "..."
    return text


class ValidationError(CommandBusError, ValueError):
    """An argument was rejected before anything was written.

    Message format: ``invalid <field> <repr(value)>: <reason>``.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self._remember_args(ValidationError, field, value, reason)
        super().__init__(f"invalid {field} {_short_repr(value)}: {reason}")


class InvalidNameError(ValidationError):
    """A domain, queue name or command type is not acceptable."""


class PayloadTooLargeError(ValidationError):
    """The encoded JSON payload exceeds the configured size limit."""


class SerializationError(ValidationError):
    """A value cannot be encoded as JSON."""


class DatabaseError(CommandBusError):
    """A PostgreSQL operation failed.

    ``sqlstate`` is the five-character SQLSTATE code when known; the original
    driver error is available as ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        sqlstate: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.sqlstate = sqlstate
        self.detail = detail
        self._remember_args(DatabaseError, message, sqlstate, detail)
        super().__init__(message)


class PostgresError(DatabaseError):
    """Error reported by the PostgreSQL server (attached as ``__cause__``)."""


_SETUP_HINT = "call commandbus.setup_database() first"


class SchemaNotInstalledError(DatabaseError):
    """The ``commandbus`` schema or the PGMQ extension is missing."""

    def __init__(
        self,
        message: str = "the commandbus schema or the pgmq extension is not installed",
        sqlstate: str | None = None,
        detail: str | None = None,
    ) -> None:
        if "setup_database()" not in message:
            message = f"{message}; {_SETUP_HINT}"
        super().__init__(message, sqlstate, detail)
        self._remember_args(SchemaNotInstalledError, message, sqlstate, detail)


class DuplicateBatchError(InvalidOperationError):
    """A batch with this batch_id already exists in the domain (SQLSTATE CB007)."""

    def __init__(self, domain: str, batch_id: str) -> None:
        self.domain = domain
        self.batch_id = batch_id
        super().__init__(f"Batch {batch_id} already exists in domain {domain}")
        self._remember_args(DuplicateBatchError, domain, batch_id)


class WorkerStoppedError(CommandBusError):
    """A stopped worker or a closed bus was used."""

    def __init__(self, message: str = "the worker is stopped") -> None:
        super().__init__(message)
