"""The one table from PostgreSQL errors to our exceptions.

`database_error` is called for every PostgreSQL error, by the psycopg path (through
`map_psycopg_error`) and by the Rust engine (rust/py/src/errors.rs), so both raise the same
exception for the same SQLSTATE. Every `CB` SQLSTATE of sql/ (listed at the top of
V001__baseline.sql) is mapped here and only here. The caller keeps the driver error as the
cause (``raise ... from err``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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


class _Error(NamedTuple):
    """What a rule sees of a PostgreSQL error (and of the call that met it)."""

    sqlstate: str
    message: str
    detail: str | None
    domain: str
    constraint: str | None


def _invalid_input(e: _Error) -> CommandBusError:
    # One SQLSTATE for every argument our functions reject; only queue names get their own type.
    if e.message.startswith("invalid queue name"):
        return InvalidNameError("queue", e.detail, e.message)
    return ValidationError("input", e.detail, e.message)


def _invalid_operation(e: _Error) -> CommandBusError:
    return InvalidOperationError(e.message)


def _duplicate_batch(e: _Error) -> CommandBusError:
    return DuplicateBatchError(e.domain, e.detail or "")


def _unique_violation(e: _Error) -> CommandBusError | None:
    # A batch row inserted directly (batch_save) reports its duplicate as a plain 23505.
    return _duplicate_batch(e) if e.constraint == "batch_pkey" else None


def _schema_missing(e: _Error) -> CommandBusError:
    return SchemaNotInstalledError(
        f"commandbus schema or PGMQ missing ({e.message})", e.sqlstate, e.detail
    )


def _our_table_missing(e: _Error) -> CommandBusError | None:
    # A missing table means setup_database() never ran only when it is one of ours; a missing
    # queue table (pgmq.q_<name>) is the caller's business.
    if "commandbus." in e.message or "pgmq.meta" in e.message:
        return _schema_missing(e)
    return None


#: SQLSTATE -> rule. A rule returns the exception, or None to fall back to DatabaseError.
_RULES: dict[str, Callable[[_Error], CommandBusError | None]] = {
    "CB001": lambda e: DuplicateCommandError(e.domain, e.detail or ""),
    "CB002": lambda e: BatchNotFoundError(e.domain, e.detail or ""),
    "CB003": _invalid_input,
    "CB004": _invalid_operation,
    "CB005": lambda e: CommandNotFoundError(e.domain, e.detail or ""),
    "CB006": _invalid_operation,
    "CB007": _duplicate_batch,
    "CB008": _invalid_operation,
    "23505": _unique_violation,
    "3F000": _schema_missing,  # invalid_schema_name: setup_database() never ran
    "42883": _schema_missing,  # undefined_function: likewise (or an older schema)
    "42P01": _our_table_missing,  # undefined_table
}


def database_error(
    sqlstate: str | None,
    message: str,
    detail: str | None,
    domain: str | None = None,
    constraint: str | None = None,
) -> CommandBusError:
    """Return the exception for a PostgreSQL error (the caller raises it, with the driver
    error as its cause).

    Args:
        sqlstate: the error's SQLSTATE (None when the driver has none).
        message: its primary message.
        detail: its DETAIL (our functions put the offending id there).
        domain: the domain of the call, for the exceptions that name one.
        constraint: the violated constraint, when the error names one.
    """
    if sqlstate is not None and (rule := _RULES.get(sqlstate)) is not None:
        found = rule(_Error(sqlstate, message, detail, domain or "", constraint))
        if found is not None:
            return found
    return DatabaseError(message, sqlstate, detail)


def map_psycopg_error(err: psycopg.Error, domain: str | None = None) -> CommandBusError:
    """`database_error` for a psycopg error (``raise map_psycopg_error(e) from e``)."""
    diag = err.diag
    message = diag.message_primary or str(err)
    return database_error(err.sqlstate, message, diag.message_detail, domain, diag.constraint_name)


def map_queue_error(err: psycopg.Error, queue_name: str) -> CommandBusError:
    """`map_psycopg_error` for an operation on a PGMQ queue: a missing queue table is named."""
    if err.sqlstate == "42P01" and f"q_{queue_name}" in str(err):
        return DatabaseError(
            f"PGMQ queue {queue_name!r} does not exist (create_queue() first)",
            err.sqlstate,
            queue_name,
        )
    return map_psycopg_error(err)
