"""Hypothesis strategies and profiles shared by the fuzz tests (unit and integration).

Profiles: ``default`` (few examples, the normal run) and ``long`` (``HYPOTHESIS_PROFILE=long``:
about 10,000 generated cases over the fuzz tests). Each test scales its own example count with
``examples(n)``: ``n`` in the default profile, ``LONG_FACTOR * n`` in the long one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
LONG_FACTOR = 40

settings.register_profile(
    "default",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
settings.load_profile(PROFILE)


def examples(n: int) -> settings:
    """Settings running ``n`` examples (``LONG_FACTOR`` times more in the long profile)."""
    return settings(max_examples=n * LONG_FACTOR if PROFILE == "long" else n)


# -- text --------------------------------------------------------------------------------

#: Characters PostgreSQL stores as they are: no NUL, no lone surrogate.
good_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
good_text = st.text(alphabet=good_chars, max_size=20)

SQL_METACHARACTERS = [
    "'",
    '"',
    ";",
    "--",
    "/*",
    "*/",
    "\\",
    "%",
    "_",
    "$1",
    "$$",
    "' OR '1'='1",
    "'; DROP TABLE commandbus.command; --",
    "pgmq.q_x",
    "a.b",
    "E'\\x00'",
]

#: Names built from SQL metacharacters, Unicode, control characters and lone surrogates.
weird_names = st.one_of(
    st.sampled_from(SQL_METACHARACTERS),
    st.lists(
        st.one_of(st.sampled_from(SQL_METACHARACTERS), st.text(max_size=5)), min_size=1, max_size=4
    ).map("".join),
    st.text(max_size=60),
    st.text(min_size=48, max_size=300),
)

# -- JSON --------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    good_text,
)

#: JSON PostgreSQL keeps exactly as sent.
good_json = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(good_text, children, max_size=4)
    ),
    max_leaves=15,
)

good_objects = st.dictionaries(good_text, good_json, max_size=5)


@dataclass(frozen=True)
class BadLeaf:
    """A value PostgreSQL cannot keep as sent, and the words the error gives for it."""

    value: Any
    reason: str
    in_key: bool = False


def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


bad_leaves = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]).map(lambda v: BadLeaf(v, "NaN")),
    st.tuples(good_text, good_text).map(lambda t: BadLeaf(f"{t[0]}\x00{t[1]}", "NUL")),
    st.tuples(good_text, st.integers(0xD800, 0xDFFF), good_text).map(
        lambda t: BadLeaf(f"{t[0]}{chr(t[1])}{t[2]}", "surrogate")
    ),
    st.integers(min_value=2**64, max_value=2**200).map(lambda v: BadLeaf(v, "64-bit")),
    st.integers(max_value=-(2**63) - 1, min_value=-(2**200)).map(lambda v: BadLeaf(v, "64-bit")),
    st.sampled_from([object(), {1, 2}, b"bytes", 1j]).map(
        lambda v: BadLeaf(v, "not JSON serializable")
    ),
    st.integers(300, 3000).map(lambda d: BadLeaf(_nested(d), "nested deeper")),
    st.sampled_from(["\x00", "k\x00", "\ud800", "\udfffk"]).map(
        lambda k: BadLeaf(k, "key", in_key=True)
    ),
)

path_steps = st.lists(st.one_of(good_text, st.integers(0, 3)), max_size=6)


def render_path(field: str, path: list[str | int]) -> str:
    return field + "".join(f"[{k!r}]" for k in path)


@st.composite
def planted(draw: st.DrawFn, field: str = "data") -> tuple[dict[str, Any], str, BadLeaf]:
    """A dict of good JSON with one bad value planted at a random path, the path the error
    must name and the bad value."""
    leaf = draw(bad_leaves)
    path: list[str | int] = [draw(good_text), *draw(path_steps)]
    # the value at the end of the path: the bad value, or a dict holding it as a key
    node: Any = {leaf.value: draw(good_json)} if leaf.in_key else leaf.value
    expected_field = render_path(field, path)
    for key in reversed(path):
        if isinstance(key, int):
            siblings = draw(st.lists(good_json, min_size=key, max_size=key))
            node = [*siblings, node]
        else:
            others = draw(st.dictionaries(good_text, good_json, max_size=2))
            others.pop(key, None)
            node = {**others, key: node}
    assert isinstance(node, dict)
    return node, expected_field, leaf
