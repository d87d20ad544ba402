"""The worker's one retry decision: which typed outcome a handler error becomes (no database)."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BusinessRuleException,
    PermanentCommandError,
    RetryPolicy,
    TransientCommandError,
    Worker,
)
from commandbus._native import Outcome


@pytest.fixture
def worker() -> Worker:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        "postgresql://nobody@127.0.0.1:1/none", open=False
    )
    schedule: Any = [1.5, 20]
    return Worker(
        pool, "orders", retry_policy=RetryPolicy(max_attempts=3, backoff_schedule=schedule)
    )


def test_transient_failures_retry_with_the_policy_backoff_until_max_attempts(
    worker: Worker,
) -> None:
    err = TransientCommandError("TIMEOUT", "slow")
    first = worker._failure(err, attempt=1, max_attempts=3)
    assert (first.kind, first.backoff) == ("RETRY", 2)  # 1.5 rounded up
    second = worker._failure(err, attempt=2, max_attempts=3)
    assert (second.kind, second.backoff) == ("RETRY", 20)
    last = worker._failure(err, attempt=3, max_attempts=3)
    assert (last.kind, last.backoff) == ("EXHAUSTED", None)


def test_the_commands_own_max_attempts_wins(worker: Worker) -> None:
    err = RuntimeError("boom")  # any exception is transient
    assert worker._failure(err, attempt=3, max_attempts=5).kind == "RETRY"
    assert worker._failure(err, attempt=5, max_attempts=5).kind == "EXHAUSTED"
    assert worker._failure(err, attempt=1, max_attempts=1).kind == "EXHAUSTED"


def test_permanent_and_business_rule_ignore_attempts(worker: Worker) -> None:
    perm = PermanentCommandError("BAD", "bad")
    rule = BusinessRuleException("RULE", "no")
    for attempt in (1, 3, 9):
        assert worker._failure(perm, attempt, 3).kind == "PERMANENT"
        assert worker._failure(rule, attempt, 3).kind == "BUSINESS_RULE"
    forced = worker._failure(TransientCommandError("T", "t"), 1, 3, permanent=True)
    assert forced.kind == "PERMANENT"


def test_a_handler_cut_off_at_stop_is_retried_at_once_unless_exhausted(worker: Worker) -> None:
    retry = worker._stopped_outcome(attempt=1, max_attempts=3)
    assert (retry.kind, retry.backoff) == ("RETRY", 0)
    assert worker._stopped_outcome(attempt=3, max_attempts=3).kind == "EXHAUSTED"


def test_outcomes_are_immutable_values() -> None:
    outcome = Outcome.retry("C", "m", None, 5)
    assert (outcome.kind, outcome.backoff) == ("RETRY", 5)
    assert Outcome.success().kind == "SUCCESS"
    assert Outcome.permanent("C", "m", '{"k": 1}').kind == "PERMANENT"
    with pytest.raises(AttributeError):
        outcome.kind = "SUCCESS"  # type: ignore[misc]
    with pytest.raises(OverflowError):
        Outcome.retry("C", "m", None, -1)
