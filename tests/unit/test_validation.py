"""Input validation and JSON encoding done before any database write."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest

from commandbus._validation import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DOMAIN_RE,
    JSON_MAX_DEPTH,
    command_message,
    decode_json,
    encode_json,
    validate_command_type,
    validate_data,
    validate_domain,
    validate_max_attempts,
    validate_queue_name,
    validate_text,
    validate_uuid,
)
from commandbus.exceptions import (
    InvalidNameError,
    PayloadTooLargeError,
    SerializationError,
    ValidationError,
)


def test_constants() -> None:
    assert DEFAULT_MAX_PAYLOAD_BYTES == 1_048_576
    assert DOMAIN_RE.pattern == "^[a-z][a-z0-9_]*$"


@pytest.mark.parametrize("domain", ["payments", "a", "a1_b", "x" * 37])
def test_validate_domain_accepts(domain: str) -> None:
    assert validate_domain(domain) is domain


def test_validate_domain_message() -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_domain("Bad-Name")
    assert str(info.value) == "invalid domain 'Bad-Name': must match ^[a-z][a-z0-9_]*$"
    assert info.value.field == "domain"
    assert info.value.value == "Bad-Name"


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("", "must match"),
        ("1abc", "must match"),
        ("_x", "must match"),
        ("a b", "must match"),
        ("Payments", "must match"),
        ("caf\u00e9", "must match"),
        ("payments\n", "must match"),
        ("pay-ments", "must match"),
        ("pay__ments", "'__'"),
        ("payments__", "'__'"),
        ("x" * 38, "too long"),
        (123, "must be a str"),
        (None, "must be a str"),
        (b"payments", "must be a str"),
    ],
)
def test_validate_domain_rejects(domain: object, reason: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_domain(domain)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"invalid domain {domain!r}: ")
    assert reason in message
    assert isinstance(info.value, ValueError)


def test_validate_domain_length_limit_names_the_queue() -> None:
    with pytest.raises(InvalidNameError, match="at most 37 characters") as info:
        validate_domain("d" * 38)
    assert "47" in str(info.value)


@pytest.mark.parametrize("name", ["payments__replies", "r", "q" * 47, "reply_1", "a__b__c"])
def test_validate_queue_name_accepts(name: str) -> None:
    assert validate_queue_name(name) is name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("q" * 48, "too long"),
        ("Replies", "must match"),
        ("", "must match"),
        ("9q", "must match"),
        ("a.b", "must match"),
        ("q\n", "must match"),
        (7, "must be a str"),
    ],
)
def test_validate_queue_name_rejects(name: object, reason: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_queue_name(name)  # type: ignore[arg-type]
    assert str(info.value).startswith(f"invalid reply_to {name!r}: ")
    assert reason in str(info.value)


def test_validate_queue_name_uses_field_name() -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_queue_name("Bad", field="queue_name")
    assert info.value.field == "queue_name"
    assert str(info.value).startswith("invalid queue_name 'Bad': ")


@pytest.mark.parametrize(
    "ct", ["DebitAccount", "a", "x" * 255, "orders.v2/Create Order", "Überweisung"]
)
def test_validate_command_type_accepts(ct: str) -> None:
    assert validate_command_type(ct) is ct


@pytest.mark.parametrize(
    ("ct", "reason"),
    [
        ("", "must not be empty"),
        ("x" * 256, "at most 255"),
        ("a\x00b", "control characters"),
        ("a\nb", "control characters"),
        ("tab\there", "control characters"),
        ("del\x7f", "control characters"),
        ("c1\x85", "control characters"),
        (None, "must be a str"),
        (42, "must be a str"),
    ],
)
def test_validate_command_type_rejects(ct: object, reason: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_command_type(ct)  # type: ignore[arg-type]
    assert info.value.field == "command_type"
    assert str(info.value).startswith(f"invalid command_type {ct!r:.50}")
    assert reason in str(info.value)


def test_validate_uuid_accepts_uuid_and_str() -> None:
    value = uuid4()
    assert validate_uuid(value, "command_id") is value
    assert validate_uuid(str(value), "command_id") == value
    assert validate_uuid(str(value).upper(), "command_id") == value
    assert isinstance(validate_uuid(value.hex, "batch_id"), UUID)


@pytest.mark.parametrize("value", ["nope", "", 123, None, b"x" * 16, 1.5])
def test_validate_uuid_rejects(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        validate_uuid(value, "batch_id")
    assert type(info.value) is ValidationError
    assert info.value.field == "batch_id"
    assert str(info.value).startswith(f"invalid batch_id {value!r}: ")


@pytest.mark.parametrize("value", [None, 1, 3, 100])
def test_validate_max_attempts_accepts(value: int | None) -> None:
    assert validate_max_attempts(value) == value


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, "3"])
def test_validate_max_attempts_rejects(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        validate_max_attempts(value)  # type: ignore[arg-type]
    assert info.value.field == "max_attempts"
    assert str(info.value).startswith(f"invalid max_attempts {value!r}: ")


def test_validate_data() -> None:
    data: dict[str, Any] = {"amount": 10}
    assert validate_data(data) is data
    assert validate_data({}) == {}


@pytest.mark.parametrize("value", [[1, 2], None, "text", 5, (("a", 1),)])
def test_validate_data_rejects_non_dict(value: object) -> None:
    with pytest.raises(ValidationError, match="must be a dict") as info:
        validate_data(value)
    assert info.value.field == "data"
    assert str(info.value).startswith(f"invalid data {value!r}: ")


@dataclasses.dataclass
class _Point:
    x: int
    y: int


def test_encode_json_returns_str() -> None:
    cid = UUID("12345678-1234-5678-1234-567812345678")
    value = {
        "id": cid,
        "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "point": _Point(1, 2),
        "items": [1, 2.5, None, True, "é"],
    }
    text = encode_json(value, "data", DEFAULT_MAX_PAYLOAD_BYTES)
    assert isinstance(text, str)
    assert decode_json(text) == {
        "id": str(cid),
        "when": "2024-01-02T03:04:05+00:00",
        "point": {"x": 1, "y": 2},
        "items": [1, 2.5, None, True, "é"],
    }


@pytest.mark.parametrize(
    ("value", "field", "bad"),
    [
        ({1: "int key"}, "data", 1),
        ({"nested": {(1, 2): "tuple key"}}, "data['nested']", (1, 2)),
        ({"s": {1, 2}}, "data['s']", {1, 2}),
        ({"big": 2**70}, "data['big']", 2**70),
        ({"small": [0, -(2**63) - 1]}, "data['small'][1]", -(2**63) - 1),
        ({"surrogate": "\ud800"}, "data['surrogate']", "\ud800"),
        ({"k\udfff": 1}, "data", "k\udfff"),
    ],
)
def test_encode_json_serialization_errors_name_the_path(
    value: object, field: str, bad: object
) -> None:
    with pytest.raises(SerializationError) as info:
        encode_json(value, "data", DEFAULT_MAX_PAYLOAD_BYTES)
    assert info.value.field == field
    assert info.value.value == bad
    assert isinstance(info.value.__cause__, orjson.JSONEncodeError)
    assert info.value.reason
    assert str(info.value).startswith(f"invalid {field} ")


def test_encode_json_unknown_type_names_its_path() -> None:
    obj = object()
    with pytest.raises(SerializationError) as info:
        encode_json({"a": [1, {"obj": obj}]}, "data", DEFAULT_MAX_PAYLOAD_BYTES)
    assert info.value.field == "data['a'][1]['obj']"
    assert info.value.value is obj
    assert "object is not JSON serializable" in info.value.reason


@pytest.mark.parametrize(
    ("value", "field", "reason"),
    [
        ({"x": float("nan")}, "data['x']", "NaN and infinities"),
        ({"x": [1.5, float("inf")]}, "data['x'][1]", "NaN and infinities"),
        ({"x": {"y": float("-inf")}}, "data['x']['y']", "NaN and infinities"),
        ({"s": "a\x00b"}, "data['s']", "NUL character at index 1"),
        ({"a\x00": 1}, "data", "key contains a NUL character"),
        ({"l": ["ok", "\udc80x"]}, "data['l'][1]", "lone surrogate"),
    ],
)
def test_encode_json_rejects_what_postgresql_would_not_keep(
    value: object, field: str, reason: str
) -> None:
    """orjson writes NaN as null (the handler would see other data) and a NUL as \\u0000
    (JSONB rejects it in the database): both are caught here, naming the path."""
    with pytest.raises(SerializationError) as info:
        encode_json(value, "data", DEFAULT_MAX_PAYLOAD_BYTES)
    assert info.value.field == field
    assert reason in info.value.reason


def test_encode_json_keeps_null_and_the_text_null() -> None:
    value = {"a": None, "b": "null", "c": [None], "d": "\\u0000 is six characters"}
    assert orjson.loads(encode_json(value, "data", DEFAULT_MAX_PAYLOAD_BYTES)) == value


def test_encode_json_nesting_limit() -> None:
    def nest(n: int) -> object:
        v: object = 1
        for _ in range(n):
            v = [v]
        return v

    encode_json(nest(JSON_MAX_DEPTH), "data", DEFAULT_MAX_PAYLOAD_BYTES)
    with pytest.raises(SerializationError) as info:
        encode_json({"deep": nest(10_000)}, "data", DEFAULT_MAX_PAYLOAD_BYTES)
    assert info.value.field.startswith("data['deep'][0][0]")
    assert f"nested deeper than {JSON_MAX_DEPTH} levels" in info.value.reason


def test_encode_json_walks_dataclasses_and_enums() -> None:
    import enum

    @dataclasses.dataclass
    class Price:
        amount: float

    class Kind(enum.Enum):
        BAD = float("nan")

    with pytest.raises(SerializationError) as info:
        encode_json({"p": Price(float("nan"))}, "data", DEFAULT_MAX_PAYLOAD_BYTES)
    assert info.value.field == "data['p']['amount']"
    with pytest.raises(SerializationError) as info:
        encode_json({"k": Kind.BAD}, "data", DEFAULT_MAX_PAYLOAD_BYTES)
    assert info.value.field == "data['k']"


@pytest.mark.parametrize(
    ("value", "reason"),
    [("a\x00", "NUL character"), ("\ud800", "lone surrogate"), (5, "must be a str")],
)
def test_validate_text(value: object, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason) as info:
        validate_text("name", value)
    assert info.value.field == "name"
    assert validate_text("name", None, optional=True) is None
    assert validate_text("name", "é ok") == "é ok"


def test_command_type_rejects_lone_surrogates() -> None:
    with pytest.raises(InvalidNameError, match="lone surrogate"):
        validate_command_type("Create\ud800")


def test_encode_json_size_limit_is_in_bytes() -> None:
    value = {"k": "é" * 10}  # {"k":"..."} = 8 bytes + 20 bytes of UTF-8
    size = len(orjson.dumps(value))
    assert size == 28
    assert encode_json(value, "data", size) == '{"k":"' + "é" * 10 + '"}'
    with pytest.raises(PayloadTooLargeError) as info:
        encode_json(value, "result", size - 1)
    assert info.value.field == "result"
    assert "28 bytes" in info.value.reason
    assert "27 bytes" in info.value.reason
    assert isinstance(info.value, ValidationError)


def test_decode_json_accepts_str_and_bytes() -> None:
    assert decode_json('{"a": [1, 2]}') == {"a": [1, 2]}
    assert decode_json(b'{"a": null}') == {"a": None}
    with pytest.raises(orjson.JSONDecodeError):
        decode_json("{not json")


def test_validate_int_and_page() -> None:
    from commandbus._validation import validate_int, validate_page

    assert validate_int("chunk_size", 1, 1) == 1
    for bad in (0, True, 1.5, "3"):
        with pytest.raises(ValidationError, match="chunk_size"):
            validate_int("chunk_size", bad, 1)
    validate_page(0, 0)
    with pytest.raises(ValidationError, match="offset"):
        validate_page(10, -1)
    with pytest.raises(ValidationError, match="limit"):
        validate_page(-1, 0)


@pytest.mark.parametrize("reply_to", [None, "", "orders__replies"])
@pytest.mark.parametrize(
    "command_type", ["CreateOrder", 'odd "quoted" \\ type', "Bestellung\u00e4"]
)
def test_command_message_is_the_predecessors_message(
    reply_to: str | None, command_type: str
) -> None:
    """The queue message built client-side has exactly the keys the SQL used to build (reply_to
    only when set), with `data` spliced in as encoded."""
    cid, corr = uuid4(), uuid4()
    data = {"n": 1, "nested": {"list": [1, 2.5, None, "x"]}, "text": 'a"b'}
    text = command_message("orders", command_type, cid, corr, reply_to,
                           encode_json(data, "data", DEFAULT_MAX_PAYLOAD_BYTES))  # fmt: skip
    expected: dict[str, Any] = {
        "domain": "orders",
        "command_type": command_type,
        "command_id": str(cid),
        "correlation_id": str(corr),
        "data": data,
    }
    if reply_to:
        expected["reply_to"] = reply_to
    assert orjson.loads(text) == expected
