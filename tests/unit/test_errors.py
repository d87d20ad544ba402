"""The SQLSTATE table of `commandbus._errors`: every row, and the psycopg adapter agreeing with
`database_error` (which the Rust engine calls)."""

from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.pq import DiagnosticField

from commandbus._errors import (
    _RULES,
    database_error,
    map_psycopg_error,
    map_queue_error,
)
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


@dataclass(frozen=True)
class Case:
    """One PostgreSQL error and what it must become."""

    id: str
    sqlstate: str | None
    message: str
    detail: str | None
    cls: type[CommandBusError]
    text: str  # str() of the exception
    attrs: dict[str, Any]
    domain: str | None = "orders"
    constraint: str | None = None


SCHEMA_HINT = "; call commandbus.setup_database() first"

CASES = [
    Case("CB001", "CB001", "duplicate command", "c-1", DuplicateCommandError,
         "Duplicate command_id c-1 in domain orders", {"domain": "orders", "command_id": "c-1"}),
    Case("CB001 without domain or detail", "CB001", "duplicate command", None,
         DuplicateCommandError, "Duplicate command_id  in domain ",
         {"domain": "", "command_id": ""}, domain=None),
    Case("CB002", "CB002", "batch not found", "b-1", BatchNotFoundError,
         "Batch b-1 not found in domain orders", {"domain": "orders", "batch_id": "b-1"}),
    Case("CB003 queue name", "CB003", "invalid queue name: too long", "x" * 60, InvalidNameError,
         f"invalid queue {'x' * 60!r}: invalid queue name: too long",
         {"field": "queue", "value": "x" * 60, "reason": "invalid queue name: too long"}),
    Case("CB003 other input", "CB003", "max_attempts must be >= 1", "0", ValidationError,
         "invalid input '0': max_attempts must be >= 1",
         {"field": "input", "value": "0", "reason": "max_attempts must be >= 1"}),
    Case("CB004", "CB004", "command is not in the TSQ", None, InvalidOperationError,
         "command is not in the TSQ", {}),
    Case("CB005", "CB005", "command not found", "c-2", CommandNotFoundError,
         "Command c-2 not found in domain orders", {"domain": "orders", "command_id": "c-2"}),
    Case("CB006", "CB006", "archived message is gone", None, InvalidOperationError,
         "archived message is gone", {}),
    Case("CB007", "CB007", "batch exists", "b-2", DuplicateBatchError,
         "Batch b-2 already exists in domain orders", {"domain": "orders", "batch_id": "b-2"}),
    Case("CB008", "CB008", "not allowed now", None, InvalidOperationError, "not allowed now", {}),
    Case("23505 batch_pkey", "23505", "duplicate key value violates unique constraint",
         "b-3", DuplicateBatchError, "Batch b-3 already exists in domain orders",
         {"domain": "orders", "batch_id": "b-3"}, constraint="batch_pkey"),
    Case("23505 other constraint", "23505", "duplicate key value", "Key (x)=(1)", DatabaseError,
         "duplicate key value", {"sqlstate": "23505", "detail": "Key (x)=(1)"},
         constraint="other_pkey"),
    Case("3F000", "3F000", 'schema "commandbus" does not exist', None, SchemaNotInstalledError,
         f'commandbus schema or PGMQ missing (schema "commandbus" does not exist){SCHEMA_HINT}',
         {"sqlstate": "3F000", "detail": None}),
    Case("42883", "42883", "function commandbus.claim_v1() does not exist", "hint?",
         SchemaNotInstalledError,
         "commandbus schema or PGMQ missing (function commandbus.claim_v1() does not exist)"
         f"{SCHEMA_HINT}", {"sqlstate": "42883", "detail": "hint?"}),
    Case("42P01 commandbus table", "42P01", 'relation "commandbus.command" does not exist', None,
         SchemaNotInstalledError,
         f'commandbus schema or PGMQ missing (relation "commandbus.command" does not exist)'
         f"{SCHEMA_HINT}", {"sqlstate": "42P01"}),
    Case("42P01 pgmq.meta", "42P01", 'relation "pgmq.meta" does not exist', None,
         SchemaNotInstalledError,
         f'commandbus schema or PGMQ missing (relation "pgmq.meta" does not exist){SCHEMA_HINT}',
         {"sqlstate": "42P01"}),
    Case("42P01 other table", "42P01", 'relation "pgmq.q_x" does not exist', None, DatabaseError,
         'relation "pgmq.q_x" does not exist', {"sqlstate": "42P01", "detail": None}),
    Case("other SQLSTATE", "40001", "could not serialize access", "d", DatabaseError,
         "could not serialize access", {"sqlstate": "40001", "detail": "d"}),
    Case("no SQLSTATE", None, "connection lost", None, DatabaseError, "connection lost",
         {"sqlstate": None, "detail": None}),
]  # fmt: skip


def _psycopg_error(case: Case) -> psycopg.Error:
    """A psycopg error as the driver raises it for `case` (diagnostics as a server sends)."""
    info: dict[int, bytes | None] = {DiagnosticField.MESSAGE_PRIMARY: case.message.encode()}
    if case.sqlstate is not None:
        info[DiagnosticField.SQLSTATE] = case.sqlstate.encode()
    if case.detail is not None:
        info[DiagnosticField.MESSAGE_DETAIL] = case.detail.encode()
    if case.constraint is not None:
        info[DiagnosticField.CONSTRAINT_NAME] = case.constraint.encode()
    cls = psycopg.errors.lookup(case.sqlstate) if case.sqlstate in ("23505", "42P01") else None
    return (cls or psycopg.DatabaseError)(f"ERROR: {case.message}", info=info)


def _check(exc: CommandBusError, case: Case) -> None:
    assert type(exc) is case.cls
    assert str(exc) == case.text
    for name, value in case.attrs.items():
        assert getattr(exc, name) == value, name


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_database_error_maps_each_row(case: Case) -> None:
    exc = database_error(case.sqlstate, case.message, case.detail, case.domain, case.constraint)
    _check(exc, case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_psycopg_adapter_agrees_with_database_error(case: Case) -> None:
    err = _psycopg_error(case)
    assert err.sqlstate == case.sqlstate
    mapped = map_psycopg_error(err, case.domain)
    _check(mapped, case)
    direct = database_error(case.sqlstate, case.message, case.detail, case.domain, case.constraint)
    assert (type(mapped), mapped.args, vars(mapped)) == (type(direct), direct.args, vars(direct))


def test_every_rule_is_exercised() -> None:
    assert set(_RULES) <= {c.sqlstate for c in CASES}
    assert {f"CB00{i}" for i in range(1, 9)} <= set(_RULES)


def test_database_error_signature_is_the_one_rust_calls() -> None:
    params = inspect.signature(database_error).parameters
    assert list(params) == ["sqlstate", "message", "detail", "domain", "constraint"]
    assert params["domain"].default is None
    assert params["constraint"].default is None
    # Positional, as the Rust side passes them.
    exc = database_error("CB005", "m", "c-9", "pay")
    assert isinstance(exc, CommandNotFoundError) and exc.domain == "pay"


def test_the_constraint_matters_only_for_a_unique_violation() -> None:
    exc = database_error("40001", "m", None, "d", "batch_pkey")
    assert type(exc) is DatabaseError


def test_a_psycopg_error_without_diagnostics_uses_its_text() -> None:
    exc = map_psycopg_error(psycopg.OperationalError("server closed the connection"))
    assert type(exc) is DatabaseError
    assert str(exc) == "server closed the connection"
    assert exc.sqlstate is None


def test_mapped_errors_still_pickle() -> None:
    for case in CASES:
        exc = database_error(case.sqlstate, case.message, case.detail, case.domain, case.constraint)
        clone = pickle.loads(pickle.dumps(exc))
        assert type(clone) is type(exc) and str(clone) == str(exc)


def test_map_queue_error_names_a_missing_queue() -> None:
    missing = _psycopg_error(
        Case("q", "42P01", 'relation "pgmq.q_jobs" does not exist', None, DatabaseError, "", {})
    )
    exc = map_queue_error(missing, "jobs")
    assert type(exc) is DatabaseError
    assert str(exc) == "PGMQ queue 'jobs' does not exist (create_queue() first)"
    assert (exc.sqlstate, exc.detail) == ("42P01", "jobs")
    # Anything else goes through the table (without a domain).
    other = _psycopg_error(CASES[0])
    assert type(map_queue_error(other, "jobs")) is DuplicateCommandError
    assert type(map_queue_error(missing, "other")) is DatabaseError
