"""Models keep reliable-cmd's names, fields, defaults and enum values."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from uuid import uuid4

import pytest

from commandbus.exceptions import ValidationError
from commandbus.models import (
    AuditEvent,
    BatchCommand,
    BatchMetadata,
    BatchSendResult,
    BatchStatus,
    Command,
    CommandMetadata,
    CommandStatus,
    CreateBatchResult,
    HandlerContext,
    Reply,
    ReplyOutcome,
    SendRequest,
    SendResult,
    TroubleshootingItem,
)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_enum_values() -> None:
    assert [s.value for s in CommandStatus] == [
        "PENDING",
        "IN_PROGRESS",
        "COMPLETED",
        "FAILED",
        "CANCELED",
        "IN_TROUBLESHOOTING_QUEUE",
    ]
    assert [s.value for s in ReplyOutcome] == ["SUCCESS", "FAILED", "CANCELED"]
    assert [s.value for s in BatchStatus] == [
        "PENDING",
        "IN_PROGRESS",
        "COMPLETED",
        "COMPLETED_WITH_FAILURES",
    ]


def test_enums_are_str_enums() -> None:
    assert CommandStatus.PENDING == "PENDING"
    assert isinstance(ReplyOutcome.SUCCESS, str)
    assert CommandStatus("IN_TROUBLESHOOTING_QUEUE") is (CommandStatus.IN_TROUBLESHOOTING_QUEUE)
    assert BatchStatus("COMPLETED_WITH_FAILURES").value == "COMPLETED_WITH_FAILURES"


@pytest.mark.parametrize(
    ("cls", "names"),
    [
        (
            Command,
            "domain command_type command_id data correlation_id reply_to created_at",
        ),
        (
            CommandMetadata,
            (
                "domain command_id command_type status attempts max_attempts "
                "msg_id correlation_id reply_to last_error_type last_error_code "
                "last_error_msg created_at updated_at batch_id result"
            ),
        ),
        (
            Reply,
            "command_id correlation_id outcome data error_code error_message",
        ),
        (
            TroubleshootingItem,
            (
                "domain command_id command_type attempts max_attempts last_error_type "
                "last_error_code last_error_msg correlation_id reply_to payload "
                "created_at updated_at"
            ),
        ),
        (
            AuditEvent,
            "audit_id domain command_id event_type timestamp details",
        ),
        (
            SendRequest,
            ("domain command_type command_id data correlation_id reply_to max_attempts batch_id"),
        ),
        (SendResult, "command_id msg_id"),
        (BatchSendResult, "results chunks_processed total_commands"),
        (
            BatchCommand,
            "command_type command_id data correlation_id reply_to max_attempts",
        ),
        (
            BatchMetadata,
            (
                "domain batch_id batch_type status name custom_data total_count "
                "completed_count failed_count canceled_count in_troubleshooting_count "
                "created_at started_at completed_at"
            ),
        ),
        (CreateBatchResult, "batch_id command_results total_commands"),
        (
            HandlerContext,
            "command attempt max_attempts msg_id visibility_extender",
        ),
    ],
)
def test_field_order(cls: type, names: str) -> None:
    assert _field_names(cls) == names.split()


def _command() -> Command:
    return Command(domain="payments", command_type="Debit", command_id=uuid4(), data={"a": 1})


def test_command_defaults_and_frozen() -> None:
    before = datetime.now(UTC)
    cmd = _command()
    assert cmd.correlation_id is None
    assert cmd.reply_to is None
    assert cmd.created_at.tzinfo is UTC
    assert before <= cmd.created_at <= datetime.now(UTC)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.domain = "other"  # type: ignore[misc]


def test_metadata_defaults() -> None:
    meta = CommandMetadata(
        domain="payments",
        command_id=uuid4(),
        command_type="Debit",
        status=CommandStatus.PENDING,
    )
    assert (meta.attempts, meta.max_attempts, meta.msg_id) == (0, 3, None)
    assert meta.batch_id is None
    assert meta.result is None
    assert meta.created_at.tzinfo is UTC
    assert meta.updated_at.tzinfo is UTC


def test_batch_metadata_defaults() -> None:
    batch = BatchMetadata(domain="payments", batch_id=uuid4())
    assert batch.batch_type == "COMMAND"
    assert batch.status is BatchStatus.PENDING
    counters = (
        batch.total_count,
        batch.completed_count,
        batch.failed_count,
        batch.canceled_count,
        batch.in_troubleshooting_count,
    )
    assert counters == (0, 0, 0, 0, 0)
    assert batch.started_at is None
    assert batch.completed_at is None
    assert batch.created_at.tzinfo is UTC


def test_send_request_defaults() -> None:
    req = SendRequest(domain="d", command_type="T", command_id=uuid4(), data={})
    assert req.max_attempts is None
    assert req.batch_id is None


def test_reply_and_batch_command_are_frozen() -> None:
    reply = Reply(command_id=uuid4(), correlation_id=None, outcome=ReplyOutcome.SUCCESS)
    assert reply.data is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        reply.data = {}  # type: ignore[misc]
    bc = BatchCommand(command_type="T", command_id=uuid4(), data={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        bc.data = {}  # type: ignore[misc]


class _RecordingExtender:
    def __init__(self) -> None:
        self.calls: list[int] = []

    async def extend(self, seconds: int) -> None:
        self.calls.append(seconds)


def _context(extender: _RecordingExtender | None) -> HandlerContext:
    return HandlerContext(
        command=_command(),
        attempt=1,
        max_attempts=3,
        msg_id=7,
        visibility_extender=extender,
    )


@pytest.mark.asyncio
async def test_extend_visibility_calls_extender() -> None:
    extender = _RecordingExtender()
    ctx = _context(extender)
    await ctx.extend_visibility(30)
    await ctx.extend_visibility(1)
    assert extender.calls == [30, 1]


@pytest.mark.asyncio
async def test_extend_visibility_without_extender() -> None:
    ctx = _context(None)
    assert ctx.visibility_extender is None
    with pytest.raises(RuntimeError, match="Visibility extender not available"):
        await ctx.extend_visibility(30)


@pytest.mark.asyncio
@pytest.mark.parametrize("seconds", [0, -5, True, 1.5, "10", None])
async def test_extend_visibility_rejects_bad_seconds(seconds: object) -> None:
    extender = _RecordingExtender()
    ctx = _context(extender)
    with pytest.raises(ValidationError) as info:
        await ctx.extend_visibility(seconds)  # type: ignore[arg-type]
    assert info.value.field == "seconds"
    assert repr(seconds) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert extender.calls == []
