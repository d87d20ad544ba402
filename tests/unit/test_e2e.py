"""The seed's E2E model (commandbus.e2e) without a database: calculator, rolls, durations."""

from __future__ import annotations

import asyncio
import random
import statistics
from uuid import uuid4

import pytest

from commandbus import Command, HandlerContext, PermanentCommandError, TransientCommandError
from commandbus.e2e import (
    Behavior,
    expected_outcomes,
    handle_test_command,
    registry,
    roll,
    sample_duration_ms,
)
from commandbus.exceptions import ValidationError


def test_calculator_matches_the_seed_examples() -> None:
    # The seed README: 10,000 commands, 2% permanent, 8% transient.
    e = expected_outcomes(Behavior(fail_permanent_pct=2, fail_transient_pct=8), 10_000)
    assert round(e.permanent) == 200
    assert round(e.transient) == 784  # "~800": 8% of the 9,800 left
    assert round(e.success) == 9_016  # "~9,000"
    assert e.timeout == 0
    # The seed's per-1000 example with 5% / 10% / 2%: ~50, ~95, ~17, ~838.
    e = expected_outcomes(Behavior(5, 10, 2), 1000)
    assert [round(e.permanent), round(e.transient), round(e.timeout), round(e.success)] == [
        50,
        95,
        17,
        838,
    ]
    assert e.permanent + e.transient + e.timeout + e.success == pytest.approx(1000)
    assert e.final_completed + e.final_tsq == pytest.approx(1000)
    assert "~50 permanent failures → TSQ immediately" in e.lines()


def test_calculator_after_retries() -> None:
    # 50% transient, 3 attempts: 1/8 exhaust them.
    e = expected_outcomes(Behavior(fail_transient_pct=50), 8000, max_attempts=3)
    assert e.final_tsq == pytest.approx(1000)
    assert e.final_completed == pytest.approx(7000)
    e = expected_outcomes(Behavior(fail_permanent_pct=100), 10)
    assert e.final_tsq == 10 and e.final_completed == 0
    with pytest.raises(ValidationError, match="count"):
        expected_outcomes(Behavior(), -1)
    with pytest.raises(ValidationError, match="max_attempts"):
        expected_outcomes(Behavior(), 1, max_attempts=0)


def test_rolls_follow_the_seed_order_and_rates() -> None:
    rng = random.Random(7)
    b = Behavior(fail_permanent_pct=5, fail_transient_pct=10, timeout_pct=2)
    n = 200_000
    counts = {"permanent": 0, "transient": 0, "timeout": 0, "success": 0}
    for _ in range(n):
        counts[roll(b, rng)] += 1
    e = expected_outcomes(b, n)
    for key, want in [
        ("permanent", e.permanent),
        ("transient", e.transient),
        ("timeout", e.timeout),
        ("success", e.success),
    ]:
        sd = (want * (1 - want / n)) ** 0.5
        assert abs(counts[key] - want) < 4 * sd, (key, counts[key], want)
    assert roll(Behavior(fail_permanent_pct=100, fail_transient_pct=100), rng) == "permanent"
    assert roll(Behavior(fail_transient_pct=100, timeout_pct=100), rng) == "transient"
    assert roll(Behavior(timeout_pct=100), rng) == "timeout"
    assert roll(Behavior(), rng) == "success"


def test_durations_are_normal_and_clamped() -> None:
    rng = random.Random(1)
    draws = [sample_duration_ms(100, 400, rng) for _ in range(20_000)]
    assert min(draws) >= 100 and max(draws) <= 400
    assert statistics.fmean(draws) == pytest.approx(250, abs=2)
    assert statistics.pstdev(draws) == pytest.approx(50, rel=0.05)
    assert sample_duration_ms(30, 30, rng) == 30.0
    assert sample_duration_ms(0, 0, rng) == 0.0


def test_behavior_validation_names_the_field() -> None:
    with pytest.raises(ValidationError, match="fail_permanent_pct"):
        Behavior(fail_permanent_pct=101)
    with pytest.raises(ValidationError, match="timeout_pct"):
        Behavior(timeout_pct=float("nan"))
    with pytest.raises(ValidationError, match="max_duration_ms"):
        Behavior(min_duration_ms=10, max_duration_ms=5)
    with pytest.raises(ValidationError, match="min_duration_ms"):
        Behavior(min_duration_ms=-1)
    with pytest.raises(ValidationError, match="behavior"):
        Behavior.from_dict({"fail_pct": 3})
    b = Behavior.from_dict({"fail_transient_pct": 8, "max_duration_ms": 5})
    assert b.to_dict() == {"fail_transient_pct": 8, "max_duration_ms": 5}
    assert Behavior.from_dict(b.to_dict()) == b


def _ctx(data: dict[str, object]) -> tuple[Command, HandlerContext]:
    cmd = Command(domain="e2e", command_type="TestCommand", command_id=uuid4(), data=data)
    return cmd, HandlerContext(command=cmd, attempt=2, max_attempts=3, msg_id=1)


def test_handler_raises_and_succeeds_by_behavior() -> None:
    assert ("e2e", "TestCommand") in registry.registered_handlers()
    cmd, ctx = _ctx({"behavior": {"fail_permanent_pct": 100, "error_code": "NOPE"}})
    with pytest.raises(PermanentCommandError) as perm:
        asyncio.run(handle_test_command(cmd, ctx))
    assert perm.value.code == "NOPE"
    cmd, ctx = _ctx({"behavior": {"fail_transient_pct": 100}})
    with pytest.raises(TransientCommandError):
        asyncio.run(handle_test_command(cmd, ctx))
    cmd, ctx = _ctx({"behavior": {"timeout_pct": 100, "timeout_seconds": 0.05}})
    result = asyncio.run(handle_test_command(cmd, ctx))
    assert result["timed_out"] is True and result["duration_ms"] >= 50
    cmd, ctx = _ctx({})
    result = asyncio.run(handle_test_command(cmd, ctx))
    assert result["status"] == "success" and result["attempt"] == 2 and not result["timed_out"]


def test_generated_ids_are_uuid7_in_time_order() -> None:
    import uuid

    from commandbus.e2e import time_ordered_uuid

    ids = [time_ordered_uuid() for _ in range(2000)]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert len(set(ids)) == len(ids)
    stamps = [u.int >> 80 for u in ids]
    assert stamps == sorted(stamps)  # ordered by their millisecond
