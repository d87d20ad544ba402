"""Exception tree: signatures, attributes and messages kept from reliable-cmd."""

from __future__ import annotations

import inspect
import pickle

import pytest

from commandbus import exceptions
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
    PostgresError,
    SchemaNotInstalledError,
    SerializationError,
    TransientCommandError,
    ValidationError,
    WorkerStoppedError,
)


def test_all_lists_every_exception_class() -> None:
    defined = {
        name
        for name, obj in vars(exceptions).items()
        if inspect.isclass(obj) and issubclass(obj, CommandBusError) and not name.startswith("_")
    }
    assert set(exceptions.__all__) == defined
    assert len(defined) == 19  # DuplicateBatchError joined the tree


def test_every_exception_derives_from_command_bus_error() -> None:
    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), CommandBusError), name


@pytest.mark.parametrize(
    ("exc", "message", "attrs"),
    [
        (
            HandlerAlreadyRegisteredError("payments", "Debit"),
            "Handler already registered for payments.Debit",
            {"domain": "payments", "command_type": "Debit"},
        ),
        (
            HandlerNotFoundError("payments", "Debit"),
            "No handler registered for payments.Debit",
            {"domain": "payments", "command_type": "Debit"},
        ),
        (
            DuplicateCommandError("payments", "abc"),
            "Duplicate command_id abc in domain payments",
            {"domain": "payments", "command_id": "abc"},
        ),
        (
            CommandNotFoundError("payments", "abc"),
            "Command abc not found in domain payments",
            {"domain": "payments", "command_id": "abc"},
        ),
        (
            BatchNotFoundError("payments", "b1"),
            "Batch b1 not found in domain payments",
            {"domain": "payments", "batch_id": "b1"},
        ),
        (InvalidOperationError("cannot retry"), "cannot retry", {}),
    ],
)
def test_predecessor_messages_and_attributes(
    exc: CommandBusError, message: str, attrs: dict[str, str]
) -> None:
    assert str(exc) == message
    assert exc.args == (message,)
    for name, value in attrs.items():
        assert getattr(exc, name) == value


@pytest.mark.parametrize(
    "cls", [TransientCommandError, PermanentCommandError, BusinessRuleException]
)
def test_coded_errors(
    cls: type[TransientCommandError | PermanentCommandError | BusinessRuleException],
) -> None:
    exc = cls("TIMEOUT", "upstream timed out", {"service": "ledger"})
    assert str(exc) == "[TIMEOUT] upstream timed out"
    assert exc.code == "TIMEOUT"
    assert exc.error_message == "upstream timed out"
    assert exc.details == {"service": "ledger"}
    assert cls("C", "m").details == {}
    assert isinstance(exc, CommandBusError)


def test_coded_errors_are_distinct_types() -> None:
    with pytest.raises(PermanentCommandError):
        raise PermanentCommandError("X", "y")
    assert not issubclass(TransientCommandError, PermanentCommandError)
    assert not issubclass(BusinessRuleException, PermanentCommandError)
    assert not issubclass(PermanentCommandError, TransientCommandError)


def test_validation_error_message_and_attributes() -> None:
    exc = ValidationError("domain", "Bad-Name", "must match ^[a-z][a-z0-9_]*$")
    assert str(exc) == "invalid domain 'Bad-Name': must match ^[a-z][a-z0-9_]*$"
    assert exc.field == "domain"
    assert exc.value == "Bad-Name"
    assert exc.reason == "must match ^[a-z][a-z0-9_]*$"
    assert isinstance(exc, ValueError)
    assert isinstance(exc, CommandBusError)


def test_validation_error_truncates_long_repr() -> None:
    value = "x" * 1000
    exc = ValidationError("data", value, "too long")
    shown = str(exc).removeprefix("invalid data ").removesuffix(": too long")
    assert len(shown) == 200
    assert shown.startswith("'xxx")
    assert shown.endswith("...")
    assert exc.value is value


def test_validation_error_survives_broken_repr() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("boom")

    exc = ValidationError("data", Broken(), "bad")
    assert str(exc) == "invalid data <unrepresentable Broken>: bad"


@pytest.mark.parametrize("cls", [InvalidNameError, PayloadTooLargeError, SerializationError])
def test_validation_subclasses(cls: type[ValidationError]) -> None:
    exc = cls("reply_to", 5, "must be a str")
    assert isinstance(exc, ValidationError)
    assert isinstance(exc, ValueError)
    assert str(exc) == "invalid reply_to 5: must be a str"
    assert (exc.field, exc.value, exc.reason) == ("reply_to", 5, "must be a str")


def test_database_error_attributes_and_cause() -> None:
    cause = PostgresError('relation "x" does not exist', "42P01", "detail text")
    with pytest.raises(DatabaseError) as info:
        raise DatabaseError("query failed", sqlstate="42P01") from cause
    exc = info.value
    assert str(exc) == "query failed"
    assert exc.sqlstate == "42P01"
    assert exc.detail is None
    assert exc.__cause__ is cause
    assert isinstance(cause, DatabaseError)
    assert cause.detail == "detail text"


def test_schema_not_installed_mentions_setup_database() -> None:
    default = SchemaNotInstalledError()
    assert "setup_database()" in str(default)
    assert isinstance(default, DatabaseError)
    custom = SchemaNotInstalledError('schema "commandbus" does not exist', "3F000")
    assert str(custom).startswith('schema "commandbus" does not exist; ')
    assert "setup_database()" in str(custom)
    assert custom.sqlstate == "3F000"
    already = SchemaNotInstalledError("run setup_database() please")
    assert str(already) == "run setup_database() please"


def test_worker_stopped_error() -> None:
    assert str(WorkerStoppedError()) == "the worker is stopped"
    assert str(WorkerStoppedError("bus is closed")) == "bus is closed"


@pytest.mark.parametrize(
    "exc",
    [
        HandlerAlreadyRegisteredError("d", "t"),
        HandlerNotFoundError("d", "t"),
        DuplicateCommandError("d", "id"),
        CommandNotFoundError("d", "id"),
        BatchNotFoundError("d", "b"),
        InvalidOperationError("nope"),
        TransientCommandError("C", "m", {"k": 1}),
        PermanentCommandError("C", "m"),
        BusinessRuleException("C", "m"),
        ValidationError("f", [1, 2], "r"),
        InvalidNameError("domain", "X", "r"),
        PayloadTooLargeError("data", {"a": 1}, "r"),
        SerializationError("data", {1, 2}, "r"),
        DatabaseError("m", "23505", "d"),
        PostgresError("m", "23505"),
        SchemaNotInstalledError(),
        SchemaNotInstalledError("missing pgmq"),
        WorkerStoppedError(),
    ],
)
def test_exceptions_pickle_round_trip(exc: CommandBusError) -> None:
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc)
    assert str(clone) == str(exc)
    assert clone.args == exc.args
    public = {k: v for k, v in vars(exc).items() if not k.startswith("_")}
    assert {k: v for k, v in vars(clone).items() if not k.startswith("_")} == public


def test_user_subclass_with_other_signature_still_pickles() -> None:
    class OutOfStockError(PermanentCommandError):
        def __init__(self, sku: str) -> None:
            super().__init__("OUT_OF_STOCK", f"{sku} is out of stock")

    exc = OutOfStockError("A1")
    # Falls back to Exception's reduce: the class is local, so only check
    # that __reduce__ does not replay the parent's three arguments.
    reduced = exc.__reduce__()
    assert reduced[1] == ("[OUT_OF_STOCK] A1 is out of stock",)
