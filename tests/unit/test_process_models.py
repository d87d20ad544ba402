"""commandbus.process: the predecessor's public names and status values, and the models'
conversions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self
from uuid import uuid4

import commandbus.process as process
from commandbus import Reply, ReplyOutcome
from commandbus.process import ProcessCommand, ProcessResponse, ProcessStatus
from commandbus.sync.process import SyncProcessReplyRouter


def test_the_predecessors_names() -> None:
    assert sorted(process.__all__) == [
        "BaseProcessManager", "PostgresProcessRepository", "ProcessAuditEntry", "ProcessCommand",
        "ProcessMetadata", "ProcessReplyRouter", "ProcessRepository", "ProcessResponse",
        "ProcessState", "ProcessStatus",
    ]  # fmt: skip
    assert all(hasattr(process, name) for name in process.__all__)
    assert SyncProcessReplyRouter.__name__ == "SyncProcessReplyRouter"


def test_status_values_are_the_predecessors_plus_ours() -> None:
    assert [s.value for s in ProcessStatus] == [
        "PENDING", "IN_PROGRESS", "WAITING", "WAITING_FOR_TSQ", "COMPENSATING", "COMPLETED",
        "COMPENSATED", "FAILED", "CANCELED",
    ]  # fmt: skip
    assert ProcessStatus.WAITING is ProcessStatus.WAITING_FOR_REPLY
    assert ProcessStatus("WAITING") is ProcessStatus.WAITING_FOR_REPLY


@dataclass
class Amount:
    cents: int

    def to_dict(self) -> dict[str, Any]:
        return {"cents": self.cents}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(data["cents"])


def test_command_and_response_conversions() -> None:
    assert ProcessCommand("Pay", Amount(5)).to_dict() == {
        "command_type": "Pay",
        "data": {"cents": 5},
    }
    assert ProcessCommand("Pay", {"x": 1}).to_dict() == {"command_type": "Pay", "data": {"x": 1}}
    reply = Reply(uuid4(), uuid4(), ReplyOutcome.SUCCESS, {"cents": 7})
    assert ProcessResponse.from_reply(reply, Amount).result == Amount(7)
    assert ProcessResponse.from_reply(reply, dict).result == {"cents": 7}
    failed = Reply(uuid4(), None, ReplyOutcome.FAILED, None, "E1", "bad")
    response = ProcessResponse.from_reply(failed, Amount)
    assert (response.outcome, response.result, response.error_code, response.error_message) == (
        ReplyOutcome.FAILED, None, "E1", "bad"
    )  # fmt: skip
