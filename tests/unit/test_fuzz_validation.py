"""Property tests of the JSON and name checks, without a database (tests/integration/
test_fuzz_inputs.py runs the same inputs through every public entry point)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from commandbus._validation import (
    DOMAIN_RE,
    encode_json,
    text_problem,
    validate_command_type,
    validate_domain,
    validate_queue_name,
)
from commandbus.exceptions import InvalidNameError, SerializationError
from fuzz_strategies import BadLeaf, examples, good_json, good_text, planted, weird_names


@examples(200)
@given(planted())
def test_a_bad_value_anywhere_is_named_by_its_path(
    case: tuple[dict[str, Any], str, BadLeaf],
) -> None:
    value, field, leaf = case
    with pytest.raises(SerializationError) as info:
        encode_json(value, "data", 10**9)
    if leaf.reason == "nested deeper":
        assert info.value.field.startswith(field)
    else:
        assert info.value.field == field
    assert leaf.reason in info.value.reason or leaf.in_key


@examples(200)
@given(good_json)
def test_good_json_is_encoded_exactly(value: Any) -> None:
    assert orjson.loads(encode_json(value, "data", 10**9)) == value


@examples(200)
@given(weird_names)
def test_names_are_accepted_only_when_safe(name: str) -> None:
    if DOMAIN_RE.fullmatch(name) and "__" not in name and len(name) <= 37:
        assert validate_domain(name) == name
    else:
        with pytest.raises(InvalidNameError) as info:
            validate_domain(name)
        assert info.value.field == "domain"
    if DOMAIN_RE.fullmatch(name) and len(name) <= 47:
        assert validate_queue_name(name) == name
    else:
        with pytest.raises(InvalidNameError):
            validate_queue_name(name)


@examples(200)
@given(st.one_of(weird_names, good_text))
def test_command_types_postgresql_cannot_store_are_rejected(name: str) -> None:
    try:
        validate_command_type(name)
    except InvalidNameError as exc:
        assert exc.field == "command_type"
    else:
        assert name and text_problem(name) is None and "\x00" not in name
        name.encode("utf-8")
