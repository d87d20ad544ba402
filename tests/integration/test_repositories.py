"""PostgresCommandRepository and PostgresAuditLogger: the predecessor's methods on our schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from itest_helpers import events, fetch
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, CommandMetadata, CommandStatus, DuplicateCommandError
from commandbus.repositories import (
    AuditEventType,
    PostgresAuditLogger,
    PostgresCommandRepository,
)

Q = "orders__commands"


def meta(cid: UUID | None = None, **kw: Any) -> CommandMetadata:
    values: dict[str, Any] = {
        "domain": "orders",
        "command_id": cid or uuid4(),
        "command_type": "Create",
        "status": CommandStatus.PENDING,
        "max_attempts": 5,
    }
    values.update(kw)
    return CommandMetadata(**values)


async def batch(pool: AsyncConnectionPool[Any], total: int, status: str = "IN_PROGRESS") -> UUID:
    batch_id = uuid4()
    await fetch(
        pool,
        "INSERT INTO commandbus.batch (domain, batch_id, status, total_count)"
        " VALUES ('orders', %s, %s, %s) RETURNING 1",
        batch_id, status, total,
    )  # fmt: skip
    return batch_id


async def counters(pool: AsyncConnectionPool[Any], batch_id: UUID) -> tuple[Any, ...]:
    [row] = await fetch(
        pool,
        "SELECT status, completed_count, failed_count, canceled_count, in_troubleshooting_count"
        " FROM commandbus.batch WHERE batch_id = %s",
        batch_id,
    )
    return row


async def test_save_get_exists_and_query(pool: AsyncConnectionPool[Any]) -> None:
    repo = PostgresCommandRepository(pool)
    corr = uuid4()
    first = meta(correlation_id=corr, reply_to="orders__replies", msg_id=7)
    await repo.save(first, Q)
    got = await repo.get("orders", first.command_id)
    assert got is not None
    assert (got.command_type, got.status, got.max_attempts, got.msg_id) == (
        "Create", CommandStatus.PENDING, 5, 7)  # fmt: skip
    assert (got.correlation_id, got.reply_to, got.attempts) == (corr, "orders__replies", 0)
    assert await repo.get("orders", uuid4()) is None
    assert await repo.get("billing", first.command_id) is None
    assert await repo.exists("orders", first.command_id)
    assert not await repo.exists("billing", first.command_id)

    with pytest.raises(DuplicateCommandError):
        await repo.save(meta(first.command_id), Q)

    others = [meta(command_type="Other") for _ in range(3)]
    await repo.save_batch(others, Q)
    with pytest.raises(DuplicateCommandError):
        await repo.save_batch([meta(), others[0]], Q)  # all or none
    assert len(await repo.query(domain="orders")) == 4

    found = await repo.exists_batch("orders", [others[0].command_id, uuid4()])
    assert found == {others[0].command_id}
    assert await repo.exists_batch("orders", []) == set()

    assert {m.command_id for m in await repo.query(command_type="Other")} == {
        m.command_id for m in others
    }
    assert await repo.query(status=CommandStatus.COMPLETED) == []
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await repo.query(created_after=future) == []
    assert len(await repo.query(domain="orders", limit=2)) == 2
    assert len(await repo.query(domain="orders", limit=2, offset=3)) == 1


async def test_conn_joins_the_callers_transaction(pool: AsyncConnectionPool[Any]) -> None:
    repo = PostgresCommandRepository(pool)
    audit = PostgresAuditLogger(pool)
    m = meta()
    async with pool.connection() as conn:
        async with conn.transaction(force_rollback=True):
            await repo.save(m, Q, conn=conn)
            await audit.log("orders", m.command_id, AuditEventType.SENT, {"a": 1}, conn=conn)
            assert await repo.exists("orders", m.command_id, conn=conn)
        assert not await repo.exists("orders", m.command_id, conn=conn)
    assert await events(pool, m.command_id) == []


async def test_row_updates(pool: AsyncConnectionPool[Any]) -> None:
    repo = PostgresCommandRepository(pool)
    m = meta()
    await repo.save(m, Q)
    cid = m.command_id
    await repo.update_status("orders", cid, CommandStatus.IN_PROGRESS)
    await repo.update_msg_id("orders", cid, 42)
    assert await repo.increment_attempts("orders", cid) == 1
    assert await repo.increment_attempts("orders", uuid4()) == 0
    await repo.update_error("orders", cid, "TRANSIENT", "TIMEOUT", "slow")
    got = await repo.get("orders", cid)
    assert got is not None
    assert (got.status, got.msg_id, got.attempts) == (CommandStatus.IN_PROGRESS, 42, 1)
    assert (got.last_error_type, got.last_error_code, got.last_error_msg) == (
        "TRANSIENT", "TIMEOUT", "slow")  # fmt: skip

    received = await repo.receive_command("orders", cid)
    assert received is not None and received[1] == 2
    assert received[0].status == CommandStatus.IN_PROGRESS

    await repo.finish_command("orders", cid, CommandStatus.COMPLETED)
    got = await repo.get("orders", cid)
    assert got is not None and got.status == CommandStatus.COMPLETED
    assert got.last_error_code == "TIMEOUT"  # kept: no new error given
    assert await repo.receive_command("orders", cid) is None  # terminal


async def test_list_by_batch(pool: AsyncConnectionPool[Any]) -> None:
    repo = PostgresCommandRepository(pool)
    batch_id = await batch(pool, 3)
    base = datetime.now(UTC)
    members = [
        meta(batch_id=batch_id, created_at=base + timedelta(seconds=i), updated_at=base)
        for i in range(3)
    ]
    members[1].status = CommandStatus.FAILED
    await repo.save_batch([*members, meta()], Q)
    listed = await repo.list_by_batch("orders", batch_id)
    assert [m.command_id for m in listed] == [m.command_id for m in members]
    failed = await repo.list_by_batch("orders", batch_id, status=CommandStatus.FAILED)
    assert [m.command_id for m in failed] == [members[1].command_id]
    page = await repo.list_by_batch("orders", batch_id, limit=1, offset=2)
    assert [m.command_id for m in page] == [members[2].command_id]


async def test_sp_receive_and_fail(pool: AsyncConnectionPool[Any]) -> None:
    repo = PostgresCommandRepository(pool)
    batch_id = await batch(pool, 1, status="PENDING")
    m = meta(batch_id=batch_id, msg_id=9)
    await repo.save(m, Q)
    received = await repo.sp_receive_command("orders", m.command_id, msg_id=9, max_attempts=4)
    assert received is not None
    metadata, attempts = received
    assert attempts == 1 and metadata.max_attempts == 4 and metadata.msg_id == 9
    assert await events(pool, m.command_id) == ["RECEIVED"]
    assert await events(pool, batch_id) == ["BATCH_STARTED"]
    assert (await counters(pool, batch_id))[0] == "IN_PROGRESS"
    [(details,)] = await fetch(
        pool, "SELECT details_json FROM commandbus.audit WHERE command_id = %s", m.command_id
    )
    assert details == {"msg_id": 9, "attempt": 1, "max_attempts": 4}

    assert await repo.sp_fail_command("orders", m.command_id, "TRANSIENT", "E", "boom", 1, 4, 9)
    assert not await repo.sp_fail_command("orders", uuid4(), "TRANSIENT", "E", "boom", 1, 4, 9)
    assert await events(pool, m.command_id) == ["RECEIVED", "FAILED"]
    got = await repo.get("orders", m.command_id)
    assert got is not None and got.last_error_msg == "boom"
    assert await repo.sp_receive_command("orders", uuid4()) is None


async def test_sp_finish_moves_batch_counters(pool: AsyncConnectionPool[Any]) -> None:
    repo = PostgresCommandRepository(pool)
    batch_id = await batch(pool, 2)
    a, b = (
        meta(batch_id=batch_id, status=CommandStatus.IN_PROGRESS),
        meta(batch_id=batch_id, status=CommandStatus.IN_PROGRESS),
    )
    await repo.save_batch([a, b], Q)

    done = await repo.sp_finish_command(
        "orders", a.command_id, CommandStatus.COMPLETED, "COMPLETED", batch_id=batch_id
    )
    assert done is False
    assert await repo.sp_finish_command(
        "orders", b.command_id, CommandStatus.IN_TROUBLESHOOTING_QUEUE, "MOVED_TO_TSQ",
        error_type="PERMANENT", error_code="BAD", error_msg="bad", details={"reason": "x"},
        batch_id=batch_id,
    ) is False  # fmt: skip
    assert await counters(pool, batch_id) == ("IN_PROGRESS", 1, 0, 0, 1)
    # Already in that status: only the audit row.
    assert not await repo.sp_finish_command(
        "orders", b.command_id, CommandStatus.IN_TROUBLESHOOTING_QUEUE, "MOVED_TO_TSQ",
        batch_id=batch_id,
    )  # fmt: skip
    assert await counters(pool, batch_id) == ("IN_PROGRESS", 1, 0, 0, 1)
    # Operator complete of the TSQ item: TSQ - 1, completed + 1, and the batch completes.
    assert await repo.sp_finish_command(
        "orders", b.command_id, CommandStatus.COMPLETED, "OPERATOR_COMPLETE", batch_id=batch_id
    )
    assert await counters(pool, batch_id) == ("COMPLETED", 2, 0, 0, 0)
    assert await events(pool, b.command_id) == ["MOVED_TO_TSQ", "MOVED_TO_TSQ", "OPERATOR_COMPLETE"]
    got = await repo.get("orders", b.command_id)
    assert got is not None and got.last_error_code == "BAD"
    # Unknown command: the audit row only, as the predecessor.
    ghost = uuid4()
    assert not await repo.sp_finish_command("orders", ghost, CommandStatus.COMPLETED, "COMPLETED")
    assert await events(pool, ghost) == ["COMPLETED"]


async def test_audit_logger(pool: AsyncConnectionPool[Any]) -> None:
    audit = PostgresAuditLogger(pool)
    cid = uuid4()
    await audit.log("orders", cid, AuditEventType.SENT, {"msg_id": 1})
    await audit.log_batch(
        [
            ("orders", cid, AuditEventType.RECEIVED, {"attempt": 1}),
            ("orders", cid, AuditEventType.COMPLETED, None),
            ("billing", cid, AuditEventType.OPERATOR_RETRY, {}),
        ]
    )
    await audit.log_batch([])
    trail = await audit.get_events(cid, "orders")
    assert [e.event_type for e in trail] == ["SENT", "RECEIVED", "COMPLETED"]
    assert trail[0].details == {"msg_id": 1} and trail[2].details is None
    assert trail[0].command_id == cid and trail[0].domain == "orders"
    assert len(await audit.get_events(cid)) == 4
    assert await audit.get_events(uuid4()) == []


async def test_audit_event_types_cover_what_the_protocol_writes(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "X", cid, {})
    trail = await PostgresAuditLogger(pool).get_events(cid)
    assert [AuditEventType(e.event_type) for e in trail] == [AuditEventType.SENT]
    assert {"RELEASED", "BATCH_STARTED", "BATCH_COMPLETED", "RETRY_SCHEDULED"} <= {
        t.value for t in AuditEventType
    }
    await bus.close()
