"""Argument validation and JSON encoding used by the bus and the worker.

All functions are pure and run before anything is written to the database,
so bad input fails fast with a :class:`~commandbus.exceptions.ValidationError`
naming the offending field and value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
    "PGMQ_MAX_QUEUE_NAME_LEN",
    "QUEUE_NAME_RE",
    "decode_json",
    "encode_json",
    "validate_command_type",
    "validate_data",
    "validate_domain",
    "validate_int",
    "validate_max_attempts",
    "validate_page",
    "validate_queue_name",
    "validate_uuid",
]

DOMAIN_RE = re.compile(r"^[a-z][a-z0-9_]*$")
QUEUE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# PGMQ rejects queue names of 48 characters or more.
PGMQ_MAX_QUEUE_NAME_LEN = 47
COMMAND_TYPE_MAX_LEN = 255
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576

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
    return ct


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
    """Return ``value`` if it is None or an int >= 1 (bools are rejected).

    Raises:
        ValidationError: Otherwise.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError("max_attempts", value, "must be None or an integer >= 1")
    return value


def validate_int(field: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``.

    Raises:
        ValidationError: Otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValidationError(field, value, f"must be an integer >= {minimum}")
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


def encode_json(value: object, field: str, max_bytes: int) -> str:
    """Encode ``value`` as JSON text with orjson.

    Dict keys must be str. orjson also encodes UUID, datetime, dataclass and
    enum values; note that it writes NaN and infinities as ``null``.

    Raises:
        SerializationError: If the value cannot be encoded.
        PayloadTooLargeError: If the UTF-8 encoding exceeds ``max_bytes``.
    """
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise SerializationError(field, value, str(exc)) from exc
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
