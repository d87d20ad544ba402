"""RetryPolicy: reliable-cmd's backoff semantics plus input validation."""

from __future__ import annotations

from typing import Any

import pytest

from commandbus.exceptions import ValidationError
from commandbus.policies import DEFAULT_RETRY_POLICY, RetryPolicy


def test_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert policy.backoff_schedule == [10, 60, 300]
    assert RetryPolicy() == DEFAULT_RETRY_POLICY


def test_default_schedule_is_not_shared() -> None:
    a = RetryPolicy()
    a.backoff_schedule.append(1)
    assert RetryPolicy().backoff_schedule == [10, 60, 300]


def test_get_backoff_follows_schedule() -> None:
    policy = RetryPolicy(max_attempts=4, backoff_schedule=[10, 60, 300])
    assert [policy.get_backoff(n) for n in (1, 2, 3)] == [10, 60, 300]
    assert policy.get_backoff(4) == 0


def test_get_backoff_reuses_last_value_beyond_schedule() -> None:
    policy = RetryPolicy(max_attempts=10, backoff_schedule=[5, 7])
    assert [policy.get_backoff(n) for n in range(1, 10)] == [5, 7, 7, 7, 7, 7, 7, 7, 7]
    assert policy.get_backoff(10) == 0
    assert policy.get_backoff(11) == 0


def test_get_backoff_attempt_below_one_uses_first_value() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_schedule=[4, 8])
    assert policy.get_backoff(0) == 4
    assert policy.get_backoff(-3) == 4


def test_get_backoff_empty_schedule_falls_back_to_30() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_schedule=[])
    assert policy.get_backoff(0) == 30
    assert policy.get_backoff(1) == 30
    assert policy.get_backoff(3) == 0


def test_float_backoff_is_rounded_up_to_int() -> None:
    schedule: Any = [0.5, 2.0, 0]
    policy = RetryPolicy(max_attempts=5, backoff_schedule=schedule)
    values = [policy.get_backoff(n) for n in (1, 2, 3)]
    assert values == [1, 2, 0]
    assert all(type(v) is int for v in values)


def test_should_retry() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry(1)
    assert policy.should_retry(2)
    assert not policy.should_retry(3)
    assert not policy.should_retry(4)
    assert not RetryPolicy(max_attempts=1).should_retry(1)


def test_accepts_tuple_and_huge_int() -> None:
    schedule: Any = (1, 10**400)
    policy = RetryPolicy(max_attempts=2, backoff_schedule=schedule)
    assert policy.get_backoff(1) == 1


def test_a_huge_backoff_is_capped_to_what_the_engine_takes() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_schedule=[10**400, 1e300])
    assert policy.retry_after(1) == policy.retry_after(2) == 2**31 - 1


def test_max_attempts_must_fit_the_int_column() -> None:
    with pytest.raises(ValidationError, match="from 1 to 2147483647"):
        RetryPolicy(max_attempts=2**31)


@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, "3", None])
def test_rejects_bad_max_attempts(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        RetryPolicy(max_attempts=value)  # type: ignore[arg-type]
    assert info.value.field == "max_attempts"
    assert f"invalid max_attempts {value!r}: " in str(info.value)


@pytest.mark.parametrize(
    ("schedule", "field", "bad"),
    [
        ([10, -1], "backoff_schedule[1]", -1),
        ([float("nan")], "backoff_schedule[0]", float("nan")),
        ([1, 2, float("inf")], "backoff_schedule[2]", float("inf")),
        ([True], "backoff_schedule[0]", True),
        (["10"], "backoff_schedule[0]", "10"),
        ([None], "backoff_schedule[0]", None),
    ],
)
def test_rejects_bad_backoff_values(schedule: list[object], field: str, bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        RetryPolicy(backoff_schedule=schedule)  # type: ignore[arg-type]
    assert info.value.field == field
    assert f"invalid {field} {bad!r}: " in str(info.value)


@pytest.mark.parametrize("schedule", ["10,60", 10, None, {10: 1}])
def test_rejects_non_list_schedule(schedule: object) -> None:
    with pytest.raises(ValidationError) as info:
        RetryPolicy(backoff_schedule=schedule)  # type: ignore[arg-type]
    assert info.value.field == "backoff_schedule"
    assert repr(schedule) in str(info.value)


def test_retry_after_decides_retry_or_exhausted_with_the_policy_limit() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_schedule=[10, 60])
    assert [policy.retry_after(n) for n in (1, 2, 3, 4)] == [10, 60, None, None]


def test_retry_after_obeys_the_commands_own_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=2, backoff_schedule=[5, 7])
    # More attempts than the policy allows: the schedule goes on past the policy's limit.
    assert [policy.retry_after(n, 4) for n in (1, 2, 3, 4)] == [5, 7, 7, None]
    # Fewer: exhausted sooner.
    assert policy.retry_after(1, 1) is None
    assert policy.retry_after(1, None) == 5


def test_retry_after_rounds_floats_up_and_keeps_zero() -> None:
    schedule: Any = [0.2, 1.5, 0]
    policy = RetryPolicy(max_attempts=9, backoff_schedule=schedule)
    values = [policy.retry_after(n) for n in (1, 2, 3, 4)]
    assert values == [1, 2, 0, 0]
    assert all(type(v) is int for v in values)


def test_retry_after_empty_schedule_falls_back_to_30() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_schedule=[])
    assert [policy.retry_after(n) for n in (0, 1, 2, 3)] == [30, 30, 30, None]
    assert policy.retry_after(5, 10) == 30


def test_get_backoff_is_retry_after_with_zero_for_exhausted() -> None:
    policy = RetryPolicy(max_attempts=4, backoff_schedule=[3, 9])
    for n in range(-1, 7):
        assert policy.get_backoff(n) == (policy.retry_after(n) or 0)
