"""Maps psycopg errors of the pure-Python path to our exceptions, as the Rust path does
(rust/py/src/errors.rs): the same SQLSTATEs, the driver error kept as the cause."""

from __future__ import annotations

import psycopg

from commandbus.exceptions import (
    BatchNotFoundError,
    CommandBusError,
    DatabaseError,
    DuplicateCommandError,
    InvalidNameError,
    SchemaNotInstalledError,
)

# invalid_schema_name, undefined_function, undefined_table: setup_database() never ran.
_SCHEMA_MISSING = {"3F000", "42883", "42P01"}


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
        return InvalidNameError("queue", detail, message)
    if sqlstate in _SCHEMA_MISSING:
        return SchemaNotInstalledError(
            f"commandbus schema or PGMQ missing ({message})", sqlstate, detail
        )
    return DatabaseError(message, sqlstate, detail)
