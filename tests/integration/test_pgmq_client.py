"""PgmqClient: round trips against a real PGMQ, notifications, errors."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from itest_helpers import fetch
from psycopg_pool import AsyncConnectionPool

from commandbus.exceptions import DatabaseError, InvalidNameError, SerializationError
from commandbus.pgmq import PGMQ_NOTIFY_CHANNEL, PgmqClient, PgmqMessage
from commandbus.pgmq.client import notify_channel

Q = "tq__test"


async def test_send_read_delete_round_trip(pool: AsyncConnectionPool[Any]) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(Q)
    await pgmq.create_queue(Q)  # idempotent
    msg_id = await pgmq.send(Q, {"a": 1, "nested": {"b": [1, 2]}})
    assert isinstance(msg_id, int)

    [msg] = await pgmq.read(Q, visibility_timeout=30, batch_size=10)
    assert isinstance(msg, PgmqMessage)
    assert msg.msg_id == msg_id
    assert msg.read_count == 1
    assert msg.message == {"a": 1, "nested": {"b": [1, 2]}}
    assert isinstance(msg.enqueued_at, str) and isinstance(msg.vt, str)
    assert await pgmq.read(Q, visibility_timeout=30) == []  # invisible while leased

    assert await pgmq.delete(Q, msg_id) is True
    assert await pgmq.delete(Q, msg_id) is False
    assert await fetch(pool, f"SELECT count(*) FROM pgmq.q_{Q}") == [(0,)]


async def test_set_vt_makes_message_visible_again(pool: AsyncConnectionPool[Any]) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(Q)
    msg_id = await pgmq.send(Q, {"n": 1})
    [first] = await pgmq.read(Q, visibility_timeout=60)
    assert await pgmq.read(Q, visibility_timeout=60) == []
    assert await pgmq.set_vt(Q, msg_id, 0) is True
    [again] = await pgmq.read(Q, visibility_timeout=60)
    assert again.msg_id == first.msg_id and again.read_count == 2
    assert await pgmq.set_vt(Q, 999_999, 0) is False


async def test_delay_hides_message(pool: AsyncConnectionPool[Any]) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(Q)
    await pgmq.send(Q, {"later": True}, delay=60)
    assert await pgmq.read(Q) == []


async def test_archive_moves_message_to_archive_table(pool: AsyncConnectionPool[Any]) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(Q)
    msg_id = await pgmq.send(Q, {"keep": "me"})
    assert await pgmq.archive(Q, msg_id) is True
    assert await pgmq.archive(Q, msg_id) is False
    assert await fetch(pool, f"SELECT msg_id, message FROM pgmq.a_{Q}") == [
        (msg_id, {"keep": "me"})
    ]
    assert await pgmq.read(Q) == []


async def test_send_batch_and_batch_delete_archive(pool: AsyncConnectionPool[Any]) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(Q)
    assert await pgmq.send_batch(Q, []) == []
    ids = await pgmq.send_batch(Q, [{"i": i} for i in range(5)])
    assert len(ids) == 5 and ids == sorted(ids)
    msgs = await pgmq.read(Q, visibility_timeout=30, batch_size=10)
    assert [m.message["i"] for m in msgs] == [0, 1, 2, 3, 4]
    assert [m.msg_id for m in msgs] == ids
    assert sorted(await pgmq.delete_batch(Q, ids[:2])) == ids[:2]
    assert sorted(await pgmq.archive_batch(Q, [*ids[2:], 424242])) == ids[2:]
    assert await fetch(pool, f"SELECT count(*) FROM pgmq.q_{Q}") == [(0,)]
    assert await fetch(pool, f"SELECT count(*) FROM pgmq.a_{Q}") == [(3,)]


async def test_conn_joins_the_callers_transaction(pool: AsyncConnectionPool[Any]) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(Q)
    async with pool.connection() as conn, conn.transaction(force_rollback=True):
        await pgmq.send(Q, {"x": 1}, conn=conn)
        await pgmq.send_batch(Q, [{"x": 2}], conn=conn)
        assert len(await pgmq.read(Q, batch_size=5, conn=conn)) == 2
    assert await pgmq.read(Q, batch_size=5) == []  # rolled back
    async with pool.connection() as conn, conn.transaction():
        msg_id = await pgmq.send(Q, {"x": 3}, conn=conn)
    [msg] = await pgmq.read(Q, visibility_timeout=30)
    assert msg.msg_id == msg_id
    async with pool.connection() as conn, conn.transaction():
        assert await pgmq.set_vt(Q, msg_id, 0, conn=conn)
        assert await pgmq.archive(Q, msg_id, conn=conn)


async def _listener(database_url: str, queue: str) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await conn.execute(f"LISTEN {notify_channel(queue)}")
    return conn


async def _notified(conn: psycopg.AsyncConnection[Any], timeout: float) -> list[str]:
    return [n.channel async for n in conn.notifies(timeout=timeout, stop_after=1)]


async def test_send_and_notify_wake_listeners(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    pgmq = PgmqClient(pool)
    await pgmq.create_queue(Q)
    assert notify_channel(Q) == f"{PGMQ_NOTIFY_CHANNEL}_{Q}" == "pgmq_notify_tq__test"
    listener = await _listener(database_url, Q)
    try:
        await pgmq.send(Q, {"wake": 1})
        assert await _notified(listener, 5.0) == ["pgmq_notify_tq__test"]

        await pgmq.send_batch(Q, [{"quiet": 1}])  # no notification, like the predecessor
        assert await _notified(listener, 0.3) == []

        await pgmq.notify(Q)
        assert await _notified(listener, 5.0) == ["pgmq_notify_tq__test"]
    finally:
        await listener.close()


async def test_validation_and_errors(pool: AsyncConnectionPool[Any]) -> None:
    pgmq = PgmqClient(pool)
    with pytest.raises(InvalidNameError) as info:
        await pgmq.send("Bad-Name", {})
    assert info.value.field == "queue_name"
    with pytest.raises(InvalidNameError):
        await pgmq.read("x" * 48)
    with pytest.raises(InvalidNameError):
        await pgmq.create_queue("1abc")
    with pytest.raises(SerializationError):
        await pgmq.send(Q, {"bad": object()})
    with pytest.raises(DatabaseError, match="does not exist"):
        await pgmq.read("no_such_queue")
    with pytest.raises(DatabaseError, match="does not exist"):
        await pgmq.send("no_such_queue", {"a": 1})
