"""Maps psycopg errors of the pure-Python path to our exceptions, as the Rust path does
(rust/py/src/errors.rs): the same SQLSTATEs, the driver error kept as the cause. Every `CB`
SQLSTATE of sql/ (listed at the top of V001__baseline.sql) is mapped here and only here."""

from __future__ import annotations

import psycopg

from commandbus.exceptions import (
    BatchNotFoundError,
    CommandBusError,
    CommandNotFoundError,
    DatabaseError,
    DuplicateBatchError,
    DuplicateCommandError,
    InvalidNameError,
    InvalidOperationError,
    SchemaNotInstalledError,
    ValidationError,
)

# invalid_schema_name, undefined_function: setup_database() never ran. An undefined_table
# (42P01) means that too only when it is one of ours (a missing queue table is another matter).
_SCHEMA_MISSING = {"3F000", "42883"}


def _schema_missing(sqlstate: str | None, message: str) -> bool:
    if sqlstate in _SCHEMA_MISSING:
        return True
    return sqlstate == "42P01" and ("commandbus." in message or "pgmq.meta" in message)


def map_psycopg_error(err: psycopg.Error, domain: str | None = None) -> CommandBusError:
    """Return the exception to raise (``raise map_psycopg_error(e) from e``)."""
    sqlstate = err.sqlstate
    detail = err.diag.message_detail if err.diag is not None else None
    message = err.diag.message_primary if err.diag is not None else None
    message = message or str(err)
    if sqlstate == "CB001":
        return DuplicateCommandError(domain or "", detail or "")
    if sqlstate == "CB002":
        return BatchNotFoundError(domain or "", detail or "")
    if sqlstate == "CB003":
        if message.startswith("invalid queue name"):
            return InvalidNameError("queue", detail, message)
        return ValidationError("input", detail, message)
    if sqlstate == "CB005":
        return CommandNotFoundError(domain or "", detail or "")
    if sqlstate in ("CB004", "CB006", "CB008"):
        return InvalidOperationError(message)
    if sqlstate == "CB007" or (
        sqlstate == "23505" and err.diag is not None and err.diag.constraint_name == "batch_pkey"
    ):
        return DuplicateBatchError(domain or "", detail or "")
    if _schema_missing(sqlstate, message):
        return SchemaNotInstalledError(
            f"commandbus schema or PGMQ missing ({message})", sqlstate, detail
        )
    return DatabaseError(message, sqlstate, detail)
