"""Argument validation and JSON encoding used by the bus and the worker.

All functions are pure and run before anything is written to the database,
so bad input fails fast with a :class:`~commandbus.exceptions.ValidationError`
naming the offending field and value.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Any
from uuid import UUID

import orjson

from commandbus.exceptions import (
    InvalidNameError,
    PayloadTooLargeError,
    SerializationError,
    ValidationError,
)

__all__ = [
    "COMMAND_TYPE_MAX_LEN",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "DOMAIN_RE",
    "INT32_MAX",
    "JSON_MAX_DEPTH",
    "PGMQ_MAX_QUEUE_NAME_LEN",
    "QUEUE_NAME_RE",
    "check_json",
    "decode_json",
    "encode_json",
    "text_problem",
    "validate_command_type",
    "validate_data",
    "validate_domain",
    "validate_int",
    "validate_max_attempts",
    "validate_page",
    "validate_queue_name",
    "validate_text",
    "validate_uuid",
]

DOMAIN_RE = re.compile(r"^[a-z][a-z0-9_]*$")
QUEUE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# PGMQ rejects queue names of 48 characters or more.
PGMQ_MAX_QUEUE_NAME_LEN = 47
COMMAND_TYPE_MAX_LEN = 255
#: The largest value of a PostgreSQL INT column (attempts, seconds).
INT32_MAX = 2**31 - 1
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576

#: Deepest nesting of JSON accepted (orjson's own limit is 254 levels of containers).
JSON_MAX_DEPTH = 254
# orjson encodes integers of this range only; PostgreSQL would take more, the encoder not.
_JSON_INT_MIN = -(2**63)
_JSON_INT_MAX = 2**64 - 1

_COMMANDS_SUFFIX = "__commands"

#: Set by `commandbus.tracing.instrument_sending()`: returns the trace context to carry in a
#: command's message (W3C `traceparent`/`tracestate`), or None. None: nothing is added.
message_trace_context: Callable[[], dict[str, str] | None] | None = None
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def validate_domain(domain: str) -> str:
    """Check a domain name and return it unchanged.

    A domain must match ``^[a-z][a-z0-9_]*$``, must not contain ``__`` (the
    separator in queue names) and ``<domain>__commands`` must fit PGMQ's
    47-character queue name limit.

    Raises:
        InvalidNameError: If the domain is not acceptable.
    """
    if not isinstance(domain, str):
        raise InvalidNameError("domain", domain, "must be a str")
    if not DOMAIN_RE.fullmatch(domain):
        raise InvalidNameError("domain", domain, f"must match {DOMAIN_RE.pattern}")
    if "__" in domain:
        raise InvalidNameError("domain", domain, "must not contain '__' (reserved as separator)")
    queue = f"{domain}{_COMMANDS_SUFFIX}"
    if len(queue) > PGMQ_MAX_QUEUE_NAME_LEN:
        limit = PGMQ_MAX_QUEUE_NAME_LEN - len(_COMMANDS_SUFFIX)
        raise InvalidNameError(
            "domain",
            domain,
            f"is too long: at most {limit} characters, so that queue name "
            f"{queue!r} fits the PGMQ limit of {PGMQ_MAX_QUEUE_NAME_LEN}",
        )
    return domain


def validate_queue_name(name: str, field: str = "reply_to") -> str:
    """Check a PGMQ queue name (e.g. ``reply_to``) and return it unchanged.

    Raises:
        InvalidNameError: If the name is not a str matching
            ``^[a-z][a-z0-9_]*$`` of at most 47 characters.
    """
    if not isinstance(name, str):
        raise InvalidNameError(field, name, "must be a str")
    if not QUEUE_NAME_RE.fullmatch(name):
        raise InvalidNameError(field, name, f"must match {QUEUE_NAME_RE.pattern}")
    if len(name) > PGMQ_MAX_QUEUE_NAME_LEN:
        raise InvalidNameError(
            field,
            name,
            f"is too long: PGMQ queue names are at most {PGMQ_MAX_QUEUE_NAME_LEN} characters",
        )
    return name


def validate_command_type(ct: str) -> str:
    """Check a command type and return it unchanged.

    Raises:
        InvalidNameError: If it is not a non-empty str of at most 255
            characters without control characters.
    """
    if not isinstance(ct, str):
        raise InvalidNameError("command_type", ct, "must be a str")
    if not ct:
        raise InvalidNameError("command_type", ct, "must not be empty")
    if len(ct) > COMMAND_TYPE_MAX_LEN:
        raise InvalidNameError(
            "command_type",
            ct,
            f"is too long: at most {COMMAND_TYPE_MAX_LEN} characters",
        )
    if _CONTROL_CHARS_RE.search(ct):
        raise InvalidNameError("command_type", ct, "must not contain control characters")
    problem = text_problem(ct)
    if problem is not None:
        raise InvalidNameError("command_type", ct, problem)
    return ct


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store ``text`` as TEXT (a NUL character, or a lone surrogate,
    which is no UTF-8), or None when it can."""
    if "\x00" in text:
        return f"contains a NUL character at index {text.index(chr(0))}: PostgreSQL cannot store it"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"contains a lone surrogate {text[exc.start]!r} at index {exc.start}: "
                "not valid UTF-8"
            )
    return None


def validate_text(field: str, value: object, *, optional: bool = False) -> str | None:
    """Return ``value`` if it is a str PostgreSQL can store as TEXT (None too when
    ``optional``).

    Raises:
        ValidationError: A wrong type, a NUL character or a lone surrogate.
    """
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValidationError(
            field, value, "must be a str or None" if optional else "must be a str"
        )
    problem = text_problem(value)
    if problem is not None:
        raise ValidationError(field, value, problem)
    return value


def validate_uuid(value: object, field: str) -> UUID:
    """Return ``value`` as a UUID; accepts a UUID or a str parseable as one.

    Raises:
        ValidationError: For any other value.
    """
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            raise ValidationError(field, value, "is not a valid UUID") from None
    raise ValidationError(field, value, "must be a UUID or a UUID string")


def validate_max_attempts(value: int | None) -> int | None:
    """Return ``value`` if it is None or an int from 1 to 2**31 - 1 (the INT column; bools
    are rejected).

    Raises:
        ValidationError: Otherwise.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT32_MAX:
        raise ValidationError(
            "max_attempts", value, f"must be None or an integer from 1 to {INT32_MAX}"
        )
    return value


def validate_int(field: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum`` (and at most
    ``maximum`` when given).

    Raises:
        ValidationError: Otherwise.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise ValidationError(field, value, f"must be an integer {bound}")
    return value


def validate_page(limit: object, offset: object) -> None:
    """Check the ``limit`` / ``offset`` of a paged query (both integers >= 0)."""
    validate_int("limit", limit, 0)
    validate_int("offset", offset, 0)


def validate_data(data: object) -> dict[str, Any]:
    """Return the command payload if it is a dict.

    Raises:
        ValidationError: If ``data`` is not a dict.
    """
    if not isinstance(data, dict):
        raise ValidationError("data", data, "must be a dict")
    return data


class _Step:
    """One step of the path from the top value to a nested one: a linked list, so that a
    deep walk does not copy paths."""

    __slots__ = ("key", "parent")

    def __init__(self, parent: _Step | None, key: object) -> None:
        self.parent = parent
        self.key = key


def _render_path(field: str, step: _Step | None) -> str:
    keys: list[object] = []
    while step is not None:
        keys.append(step.key)
        step = step.parent
    return field + "".join(f"[{k!r}]" for k in reversed(keys))


_SCALARS = (bool, type(None), UUID, datetime, date, time)


def _json_problem(value: object, field: str) -> tuple[str, object, str] | None:
    """The first value under ``value`` that cannot be stored faithfully as PostgreSQL
    JSONB, as (path, value, reason): a NaN or an infinity (orjson writes them as null, so
    the handler would see other data than was sent), a NUL character or a lone surrogate in
    a string or a key, a key that is not a str, an integer outside 64 bits, nesting deeper
    than JSON_MAX_DEPTH, or a type orjson does not encode. Iterative: any depth is safe."""
    stack: list[tuple[object, _Step | None, int]] = [(value, None, 0)]
    while stack:
        v, step, depth = stack.pop()
        if isinstance(v, str):
            problem = text_problem(v)
            if problem is not None:
                return _render_path(field, step), v, problem
        elif isinstance(v, _SCALARS):
            continue
        elif isinstance(v, int):
            if not _JSON_INT_MIN <= v <= _JSON_INT_MAX:
                return (
                    _render_path(field, step),
                    v,
                    "integer outside the 64-bit range JSON is encoded in",
                )
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return (
                    _render_path(field, step),
                    v,
                    "NaN and infinities are not JSON (they would be stored as null)",
                )
        elif isinstance(v, enum.Enum):
            stack.append((v.value, step, depth))
        elif depth >= JSON_MAX_DEPTH and isinstance(v, dict | list | tuple):
            return _render_path(field, step), v, f"nested deeper than {JSON_MAX_DEPTH} levels"
        elif isinstance(v, dict):
            for k, item in reversed(list(v.items())):
                if not isinstance(k, str):
                    return _render_path(field, step), k, "a key must be a str"
                problem = text_problem(k)
                if problem is not None:
                    return _render_path(field, step), k, f"key {problem}"
                stack.append((item, _Step(step, k), depth + 1))
        elif isinstance(v, list | tuple):
            for i in range(len(v) - 1, -1, -1):
                stack.append((v[i], _Step(step, i), depth + 1))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            if depth >= JSON_MAX_DEPTH:
                return _render_path(field, step), v, f"nested deeper than {JSON_MAX_DEPTH} levels"
            for f in reversed(dataclasses.fields(v)):
                stack.append((getattr(v, f.name), _Step(step, f.name), depth + 1))
        else:
            return _render_path(field, step), v, f"{type(v).__name__} is not JSON serializable"
    return None


# Encoded JSON that holds one of these may hide a value PostgreSQL cannot keep as sent: orjson
# writes NaN and infinities as `null`, and a NUL as `\u0000`, which JSONB rejects. Only then is
# the value walked, so the common payload costs two substring searches.
_SUSPECT = (b"null", b"\\u0000")


def check_json(value: object, field: str) -> bytes:
    """Encode ``value`` with orjson and return the bytes, once it is sure PostgreSQL stores
    exactly that value as JSONB.

    Raises:
        SerializationError: naming the path of the offending value inside ``field`` (e.g.
            ``data['items'][2]['price']``): a NaN or an infinity, a NUL character or a lone
            surrogate in a string or a key, a key that is not a str, an integer outside 64
            bits, nesting too deep, or a value of a type that is not JSON.
    """
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        found = _json_problem(value, field)
        if found is not None:
            raise SerializationError(*found) from exc
        raise SerializationError(field, value, str(exc)) from exc
    if any(s in encoded for s in _SUSPECT):
        found = _json_problem(value, field)
        if found is not None:
            raise SerializationError(*found)
    return encoded


def encode_json(value: object, field: str, max_bytes: int) -> str:
    """Encode ``value`` as JSON text with orjson (checked by :func:`check_json`).

    Dict keys must be str. orjson also encodes UUID, datetime, dataclass and enum values.

    Raises:
        SerializationError: If the value cannot be encoded or stored as it is (see
            :func:`check_json`; the error's field is the path of the offending value).
        PayloadTooLargeError: If the UTF-8 encoding exceeds ``max_bytes``.
    """
    encoded = check_json(value, field)
    size = len(encoded)
    if size > max_bytes:
        raise PayloadTooLargeError(
            field,
            value,
            f"encoded JSON is {size} bytes, over the limit of {max_bytes} bytes",
        )
    return encoded.decode("utf-8")


def command_message(
    domain: str,
    command_type: str,
    command_id: UUID,
    correlation_id: UUID,
    reply_to: str | None,
    data_json: str,
) -> str:
    """The JSON text of a command's queue message, with the predecessor's keys: `domain`,
    `command_type`, `command_id`, `correlation_id`, `reply_to` (only when set), `trace_context`
    (only with tracing instrumented and a span current) and `data`,
    where `data_json` (from `encode_json`) is spliced in as it is, not encoded again."""
    head: dict[str, object] = {
        "domain": domain,
        "command_type": command_type,
        "command_id": command_id,
        "correlation_id": correlation_id,
    }
    if reply_to:
        head["reply_to"] = reply_to
    if message_trace_context is not None and (carrier := message_trace_context()):
        head["trace_context"] = carrier
    return f'{orjson.dumps(head)[:-1].decode()},"data":{data_json}}}'


def decode_json(text: str | bytes) -> Any:
    """Decode JSON text or bytes with orjson."""
    return orjson.loads(text)
