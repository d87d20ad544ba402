"""BatchMetadata.waiting_for_operator: every command of the batch that is not finished waits in
the troubleshooting queue (a command in the TSQ is not finished)."""

from __future__ import annotations

import dataclasses
from uuid import uuid4

import pytest

from commandbus import BatchMetadata, BatchStatus


def batch(total: int, done: int, failed: int, canceled: int, tsq: int) -> BatchMetadata:
    return BatchMetadata(
        domain="billing",
        batch_id=uuid4(),
        status=BatchStatus.IN_PROGRESS,
        total_count=total,
        completed_count=done,
        failed_count=failed,
        canceled_count=canceled,
        in_troubleshooting_count=tsq,
    )


@pytest.mark.parametrize(
    ("counters", "waiting"),
    [
        ((4, 1, 1, 0, 2), True),  # the two remaining are both in the TSQ
        ((3, 0, 0, 0, 3), True),
        ((5, 1, 1, 2, 1), True),
        ((4, 1, 0, 0, 2), False),  # one still pending or running
        ((3, 0, 0, 0, 0), False),  # nothing started
        ((3, 2, 1, 0, 0), False),  # finished: nothing remains
        ((0, 0, 0, 0, 0), False),
    ],
)
def test_waiting_for_operator(counters: tuple[int, int, int, int, int], waiting: bool) -> None:
    assert batch(*counters).waiting_for_operator is waiting


def test_it_is_a_property_not_a_field() -> None:
    """Constructors, equality and asdict() of the predecessor's dataclass are unchanged."""
    names = [f.name for f in dataclasses.fields(BatchMetadata)]
    assert "waiting_for_operator" not in names
    assert "waiting_for_operator" not in dataclasses.asdict(batch(1, 0, 0, 0, 1))
    assert set(BatchStatus) == {
        BatchStatus.PENDING, BatchStatus.IN_PROGRESS, BatchStatus.COMPLETED,
        BatchStatus.COMPLETED_WITH_FAILURES,
    }  # fmt: skip
