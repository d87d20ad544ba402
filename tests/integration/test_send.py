"""Sending: the Rust path, the caller's-transaction path, duplicates, validation, queries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from itest_helpers import events, fetch, function_calls, queue_depth, read_queue, wait_until
from psycopg_pool import AsyncConnectionPool

import commandbus.bus
from commandbus import (
    BatchCommand,
    BatchNotFoundError,
    CommandBus,
    CommandStatus,
    DuplicateCommandError,
    InvalidNameError,
    PayloadTooLargeError,
    SendRequest,
    SerializationError,
    ValidationError,
)
from commandbus.exceptions import PostgresError


async def test_send_writes_command_message_and_audit(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    cid, corr = uuid4(), uuid4()
    result = await bus.send(
        "orders", "CreateOrder", cid, {"sku": "A1", "n": 2}, correlation_id=corr,
        reply_to="orders__replies", max_attempts=5,
    )  # fmt: skip
    assert result.command_id == cid and result.msg_id > 0

    meta = await bus.get_command("orders", cid)
    assert meta is not None
    assert meta.status == CommandStatus.PENDING
    assert (meta.attempts, meta.max_attempts, meta.msg_id) == (0, 5, result.msg_id)
    assert meta.correlation_id == corr and meta.reply_to == "orders__replies"
    assert await bus.command_exists("orders", cid)
    assert not await bus.command_exists("orders", uuid4())
    assert await bus.get_command("orders", uuid4()) is None

    # The queue message keeps the predecessor's keys; the correlation id is the same value
    # in the row, the message and (later) the reply.
    [message] = await read_queue(pool, "orders__commands")
    assert message == {
        "domain": "orders",
        "command_type": "CreateOrder",
        "command_id": str(cid),
        "correlation_id": str(corr),
        "reply_to": "orders__replies",
        "data": {"sku": "A1", "n": 2},
    }
    trail = await bus.get_audit_trail(cid)
    assert [e.event_type for e in trail] == ["SENT"]
    assert trail[0].details is not None
    assert trail[0].details["msg_id"] == result.msg_id
    assert trail[0].details["correlation_id"] == str(corr)
    # The reply queue was created on demand.
    assert await fetch(pool, "SELECT 1 FROM pgmq.meta WHERE queue_name = 'orders__replies'")


async def test_correlation_id_is_generated_when_absent(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "X", cid, {})
    meta = await bus.get_command("orders", cid)
    assert meta is not None and meta.correlation_id is not None
    [message] = await read_queue(pool, "orders__commands")
    assert message["correlation_id"] == str(meta.correlation_id)
    assert "reply_to" not in message


async def test_send_on_callers_connection_commits_with_business_rows(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE orders_biz (id uuid primary key)")
    cid = uuid4()
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("INSERT INTO orders_biz VALUES (%s)", (cid,))
        await bus.send("orders", "CreateOrder", cid, {"a": 1}, conn=conn)
        # Not visible outside the caller's transaction yet.
        assert not await bus.command_exists("orders", cid)
    assert await bus.command_exists("orders", cid)
    assert await fetch(pool, "SELECT id FROM orders_biz") == [(cid,)]
    assert await queue_depth(pool, "orders__commands") == 1
    assert await events(pool, cid) == ["SENT"]


async def test_send_on_callers_connection_rolls_back_with_business_rows(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    await bus.send("orders", "Warmup", uuid4(), {})  # the queue exists; its message stays
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE orders_biz (id uuid primary key)")
    cid = uuid4()
    with pytest.raises(RuntimeError, match="business failure"):
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO orders_biz VALUES (%s)", (cid,))
            await bus.send("orders", "CreateOrder", cid, {"a": 1}, conn=conn)
            raise RuntimeError("business failure")
    assert not await bus.command_exists("orders", cid)
    assert await fetch(pool, "SELECT id FROM orders_biz") == []
    assert await queue_depth(pool, "orders__commands") == 1
    assert await events(pool, cid) == []


@pytest.mark.parametrize("on_conn", [False, True], ids=["rust", "psycopg"])
async def test_duplicate_command_id_raises_typed_error(
    pool: AsyncConnectionPool[Any], on_conn: bool
) -> None:
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send("orders", "A", cid, {})
    with pytest.raises(DuplicateCommandError) as info:
        if on_conn:
            async with pool.connection() as conn, conn.transaction():
                await bus.send("orders", "A", cid, {}, conn=conn)
        else:
            await bus.send("orders", "A", cid, {})
    assert info.value.command_id == str(cid) and info.value.domain == "orders"
    cause = info.value.__cause__
    if on_conn:
        assert isinstance(cause, psycopg.Error) and cause.sqlstate == "CB001"
    else:
        assert isinstance(cause, PostgresError) and cause.sqlstate == "CB001"
    # Nothing of the failed send remains: one message, one SENT row.
    assert await queue_depth(pool, "orders__commands") == 1
    assert await events(pool, cid) == ["SENT"]
    # The same id in another domain is a different command.
    await bus.send("billing", "A", cid, {})


async def test_duplicate_under_concurrent_race(pool: AsyncConnectionPool[Any]) -> None:
    """Two transactions send the same id at once: one wins, the other gets the typed error."""
    bus = CommandBus(pool)
    await bus.send("orders", "Warmup", uuid4(), {})
    cid = uuid4()
    first_inserted = asyncio.Event()

    async def first() -> None:
        async with pool.connection() as conn, conn.transaction():
            await bus.send("orders", "A", cid, {"who": 1}, conn=conn)
            first_inserted.set()
            await asyncio.sleep(0.5)  # hold the row uncommitted while the other tries

    async def second() -> None:
        await first_inserted.wait()
        await bus.send("orders", "A", cid, {"who": 2})  # blocks on the first, then conflicts

    results = await asyncio.gather(first(), second(), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], DuplicateCommandError)
    assert await events(pool, cid) == ["SENT"]
    assert await queue_depth(pool, "orders__commands") == 2


async def test_send_batch_keeps_order_chunks_and_rejects_inner_duplicates(
    pool: AsyncConnectionPool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commandbus.bus, "SEND_GROUP_COMMANDS", 20)  # progress every 2 chunks
    bus = CommandBus(pool)
    requests = [
        SendRequest(
            domain="orders" if i % 3 else "billing",
            command_type="T",
            command_id=uuid4(),
            data={"i": i},
        )
        for i in range(25)
    ]
    progress: list[tuple[int, int]] = []
    result = await bus.send_batch(
        requests, chunk_size=10, on_progress=lambda s, t: progress.append((s, t))
    )
    assert result.total_commands == 25 and result.chunks_processed == 3
    assert [r.command_id for r in result.results] == [r.command_id for r in requests]
    assert progress == [(20, 25), (25, 25)]
    assert (
        await queue_depth(pool, "orders__commands") + await queue_depth(pool, "billing__commands")
        == 25
    )

    dup = uuid4()
    with pytest.raises(DuplicateCommandError):
        await bus.send_batch(
            [SendRequest("orders", "T", dup, {}), SendRequest("orders", "T", dup, {})]
        )
    assert not await bus.command_exists("orders", dup)
    with pytest.raises(DuplicateCommandError):  # against a stored command: chunk rolled back
        await bus.send_batch([SendRequest("orders", "T", uuid4(), {}), requests[1]])
    assert (await bus.send_batch([])).total_commands == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"domain": "Bad-Domain"}, InvalidNameError, "domain"),
        ({"domain": "a__b"}, InvalidNameError, "domain"),
        ({"domain": "x" * 40}, InvalidNameError, "domain"),
        ({"reply_to": "no such queue"}, InvalidNameError, "reply_to"),
        ({"command_type": ""}, ValidationError, "command_type"),
        ({"data": {"when": object()}}, SerializationError, "data['when']"),
        ({"data": {"blob": "x" * 2_000_000}}, PayloadTooLargeError, "data"),
        ({"data": ["not", "a", "dict"]}, ValidationError, "data"),
        ({"max_attempts": 0}, ValidationError, "max_attempts"),
        ({"command_id": "not-a-uuid"}, ValidationError, "command_id"),
    ],
)
async def test_bad_input_raises_before_anything_is_written(
    pool: AsyncConnectionPool[Any], kwargs: dict[str, Any], error: type[Exception], field: str
) -> None:
    bus = CommandBus(pool)
    args: dict[str, Any] = {
        "domain": "orders",
        "command_type": "T",
        "command_id": uuid4(),
        "data": {},
    }
    args.update(kwargs)
    with pytest.raises(error) as info:
        await bus.send(**args)
    assert isinstance(info.value, ValidationError) and info.value.field == field
    assert await fetch(pool, "SELECT count(*) FROM commandbus.command") == [(0,)]
    assert await fetch(pool, "SELECT count(*) FROM commandbus.audit") == [(0,)]


async def test_unknown_batch_id_raises_batch_not_found(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    batch_id = uuid4()
    with pytest.raises(BatchNotFoundError) as info:
        await bus.send("orders", "T", uuid4(), {}, batch_id=batch_id)
    assert info.value.batch_id == str(batch_id)
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO commandbus.batch (domain, batch_id) VALUES ('orders', %s)",
            (batch_id,),
        )
    cid = uuid4()
    await bus.send("orders", "T", cid, {}, batch_id=batch_id)
    meta = await bus.get_command("orders", cid)
    assert meta is not None and meta.batch_id == batch_id


async def test_query_commands_filters_and_pages(pool: AsyncConnectionPool[Any]) -> None:
    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(5)]
    for i, cid in enumerate(ids):
        await bus.send("orders" if i < 4 else "billing", "A" if i % 2 else "B", cid, {})
    assert len(await bus.query_commands(domain="orders")) == 4
    assert len(await bus.query_commands(domain="orders", command_type="A")) == 2
    assert len(await bus.query_commands(status=CommandStatus.PENDING)) == 5
    assert await bus.query_commands(status=CommandStatus.COMPLETED) == []
    page1 = await bus.query_commands(limit=3, offset=0)
    page2 = await bus.query_commands(limit=3, offset=3)
    assert len(page1) == 3 and len(page2) == 2
    assert {m.command_id for m in page1 + page2} == set(ids)
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await bus.query_commands(created_after=future) == []
    assert len(await bus.query_commands(created_before=future)) == 5
    with pytest.raises(ValidationError):
        await bus.query_commands(limit=-1)


async def test_sends_into_a_batch_count_and_a_complete_batch_takes_no_more(
    pool: AsyncConnectionPool[Any],
) -> None:
    from commandbus import InvalidOperationError

    bus = CommandBus(pool)
    batch_id = uuid4()
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO commandbus.batch (domain, batch_id) VALUES ('orders', %s)", (batch_id,)
        )
    for _ in range(3):
        await bus.send("orders", "T", uuid4(), {}, batch_id=batch_id)
    assert await fetch(
        pool, "SELECT total_count FROM commandbus.batch WHERE batch_id = %s", batch_id
    ) == [(3,)]
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE commandbus.batch SET status = 'COMPLETED', completed_at = now()"
            " WHERE batch_id = %s",
            (batch_id,),
        )
    late = uuid4()
    with pytest.raises(InvalidOperationError, match="already complete"):
        await bus.send("orders", "T", late, {}, batch_id=batch_id)
    assert not await bus.command_exists("orders", late)


async def test_send_batch_writes_nothing_when_a_later_chunk_is_bad(
    pool: AsyncConnectionPool[Any],
) -> None:
    bus = CommandBus(pool)
    good = [SendRequest("orders", "T", uuid4(), {"i": i}) for i in range(25)]
    bad = SendRequest("orders", "T", uuid4(), {"when": object()})
    with pytest.raises(SerializationError) as info:
        await bus.send_batch([*good, bad], chunk_size=10)
    assert info.value.field == "data['when']"
    assert await fetch(pool, "SELECT count(*) FROM commandbus.command") == [(0,)]
    # Not even the queue was created: the first chunk never went out.
    assert await fetch(pool, "SELECT count(*) FROM pgmq.meta") == [(0,)]


async def test_bulk_payloads_shared_or_fresh_are_sent_as_they_are(
    pool: AsyncConnectionPool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payload object shared by many requests is encoded once per call; payloads made afresh
    for each command each keep their own content; a shared payload over the limit is refused."""
    bus = CommandBus(pool)
    encodes = 0
    real = commandbus.bus.encode_json

    def counting(value: object, field: str, max_bytes: int) -> str:
        nonlocal encodes
        encodes += 1
        return real(value, field, max_bytes)

    monkeypatch.setattr(commandbus.bus, "encode_json", counting)
    shared = {"behavior": {"fail_permanent_pct": 1.0}}
    await bus.send_batch([SendRequest("orders", "T", uuid4(), shared) for _ in range(300)], 100)
    assert encodes == 1

    ids = [uuid4() for _ in range(200)]
    await bus.create_batch(
        "orders", [BatchCommand("T", cid, {"i": i}) for i, cid in enumerate(ids)], name="fresh"
    )
    assert encodes == 1 + 200  # each fresh payload encoded, none taken for another
    by_id = dict(
        await fetch(
            pool,
            "SELECT (message->>'command_id')::uuid, (message->'data'->>'i')::int"
            " FROM pgmq.q_orders__commands WHERE message->'data' ? 'i'",
        )
    )
    assert [by_id[cid] for cid in ids] == list(range(200))
    assert await fetch(
        pool,
        "SELECT count(*) FROM pgmq.q_orders__commands"
        " WHERE message->'data' = '{\"behavior\": {\"fail_permanent_pct\": 1.0}}'::jsonb",
    ) == [(300,)]

    big = {"blob": "x" * 300}
    small = CommandBus(pool, max_payload_bytes=200)
    with pytest.raises(PayloadTooLargeError):
        await small.send_batch([SendRequest("orders", "T", uuid4(), big) for _ in range(3)])


async def test_send_batch_messages_take_queue_ids_in_request_order(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The send path inserts into PGMQ's table itself: same row shape as pgmq.send_batch, ids in
    request order, command ids given as strings come back as UUIDs."""
    bus = CommandBus(pool)
    ids = [uuid4() for _ in range(30)]
    requests = [
        SendRequest("orders", "T", str(cid) if i % 2 else cid, {"i": i})  # type: ignore[arg-type]
        for i, cid in enumerate(ids)
    ]
    result = await bus.send_batch(requests, chunk_size=7)
    assert [r.command_id for r in result.results] == ids
    msg_ids = [r.msg_id for r in result.results]
    assert msg_ids == sorted(msg_ids) and len(set(msg_ids)) == 30
    rows = await fetch(
        pool,
        "SELECT msg_id, message->>'command_id', (message->'data'->>'i')::int, read_ct,"
        " vt <= clock_timestamp(), enqueued_at IS NOT NULL, headers IS NULL"
        " FROM pgmq.q_orders__commands ORDER BY msg_id",
    )
    expected = [
        (m, str(c), i, 0, True, True, True)
        for i, (m, c) in enumerate(zip(msg_ids, ids, strict=True))
    ]
    assert rows == expected
    stored = await fetch(pool, "SELECT command_id, msg_id FROM commandbus.command ORDER BY msg_id")
    assert stored == list(zip(ids, msg_ids, strict=True))


async def test_send_recovers_when_its_connections_were_killed(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The send path skips sqlx's ping for connections busy within the last second; one idle
    longer is pinged first, so a connection the server ended is replaced, not reported."""
    bus = CommandBus(pool)
    try:
        await bus.send("orders", "T", uuid4(), {})
        killed = await fetch(
            pool,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'rcmd bus' AND datname = current_database()",
        )
        assert killed and all(ok for (ok,) in killed)
        await asyncio.sleep(1.2)
        cid = uuid4()
        result = await bus.send("orders", "T", cid, {})
        assert result.command_id == cid
        assert await bus.command_exists("orders", cid)
    finally:
        await bus.close()


async def test_a_command_id_repeated_in_one_sql_call_is_named_and_nothing_is_written(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The library refuses repeated ids before sending; a direct SQL caller gets CB001 naming
    the id from the insert itself (there is no separate pass over the ids)."""
    cid, other = uuid4(), uuid4()
    with pytest.raises(psycopg.DatabaseError) as info:
        await fetch(
            pool,
            "SELECT * FROM commandbus.send_commands_v2('orders', %s, ARRAY['T', 'T', 'T'],"
            " ARRAY['{}', '{}', '{}']::jsonb[], ARRAY[gen_random_uuid(), gen_random_uuid(),"
            " gen_random_uuid()], ARRAY[NULL, NULL, NULL]::text[], ARRAY[3, 3, 3],"
            " ARRAY[NULL, NULL, NULL]::uuid[])",
            [other, cid, cid],
        )
    assert info.value.sqlstate == "CB001"
    assert info.value.diag.message_detail == str(cid)
    assert await fetch(pool, "SELECT count(*) FROM commandbus.command") == [(0,)]
    assert await fetch(pool, "SELECT count(*) FROM pgmq.meta") == [(0,)]  # rolled back too


async def test_plain_sends_take_the_direct_statement_and_write_what_the_function_writes(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The Rust path sends commands without batch or reply queue with `send_commands_direct`
    (no function call); its rows are the ones `send_commands_v2` writes for the same input."""
    async with pool.connection() as conn:
        await conn.execute("ALTER DATABASE " + conn.info.dbname + " SET track_functions = 'pl'")
    bus = CommandBus(pool, native_max_connections=1)  # one engine connection: ordered stats
    try:
        first = uuid4()
        await bus.send("orders", "T", first, {"n": 0})  # no queue yet: the function creates it
        direct = [uuid4() for _ in range(3)]
        for i, cid in enumerate(direct[:2]):
            await bus.send("orders", "T", cid, {"n": i + 1}, correlation_id=cid, max_attempts=4)
        req = SendRequest("orders", "T", direct[2], {"n": 3}, correlation_id=direct[2],
                          max_attempts=4)  # fmt: skip
        batch = await bus.send_batch([req])
        await bus.send("orders", "T", uuid4(), {}, reply_to="orders__replies")  # the function
        # The engine connection's function statistics reach the server at its next idle flush.
        await wait_until(lambda: _at_least(function_calls(pool, "send_commands_v2"), 2), timeout=10)
        assert await function_calls(pool, "send_commands_v2") == 2

        # The same commands through the function (the caller's-connection path), for comparison.
        via_function = [uuid4() for _ in range(3)]
        async with pool.connection() as conn:
            for i, cid in enumerate(via_function):
                await bus.send("orders", "T", cid, {"n": i + 1}, correlation_id=cid,
                               max_attempts=4, conn=conn)  # fmt: skip
    finally:
        await bus.close()

    async def shape(cid: Any) -> tuple[Any, ...]:
        [row] = await fetch(
            pool,
            "SELECT c.queue_name, c.command_type, c.status, c.attempts, c.max_attempts,"
            " c.reply_queue, c.batch_id, c.in_tsq, q.read_ct, q.message - 'command_id'"
            " - 'correlation_id', q.vt <= clock_timestamp(), a.event_type,"
            " a.details_json - 'msg_id' - 'correlation_id', (a.details_json->>'msg_id')::bigint"
            " = c.msg_id, c.correlation_id = %s"
            " FROM commandbus.command c JOIN pgmq.q_orders__commands q USING (msg_id)"
            " JOIN commandbus.audit a ON a.command_id = c.command_id"
            " WHERE c.domain = 'orders' AND c.command_id = %s",
            cid,
            cid,
        )
        return row

    assert batch.results[0].command_id == direct[2] and batch.results[0].msg_id > 0
    got = [await shape(c) for c in direct]
    want = [await shape(c) for c in via_function]
    assert got == want
    assert got[0][9] == {"domain": "orders", "command_type": "T", "data": {"n": 1}}
    assert got[0][12] == {"command_type": "T", "reply_to": None, "batch_id": None}


async def _at_least(value: Awaitable[int], n: int) -> bool:
    return await value >= n


async def test_send_recreates_a_queue_dropped_under_a_prepared_direct_statement(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The engine's connection keeps the direct statement prepared for the queue's table; when
    the queue is dropped, the next send falls back to the function, which creates it again."""
    bus = CommandBus(pool, native_max_connections=1)
    try:
        for _ in range(2):
            await bus.send("orders", "T", uuid4(), {})
        await fetch(pool, "SELECT pgmq.drop_queue('orders__commands')")
        cid = uuid4()
        result = await bus.send("orders", "T", cid, {})
        [message] = await read_queue(pool, "orders__commands")
        assert message["command_id"] == str(cid)
        assert await fetch(
            pool, "SELECT msg_id FROM commandbus.command WHERE command_id = %s", cid
        ) == [(result.msg_id,)]
        await bus.send("orders", "T", uuid4(), {})  # and the direct statement works again
        assert await queue_depth(pool, "orders__commands") == 2
    finally:
        await bus.close()


async def test_send_batch_chunks_run_at_once_but_keep_request_order(
    pool: AsyncConnectionPool[Any],
) -> None:
    """Two chunks' statements run at once on the Rust path; msg_ids and vt are reserved per
    chunk in request order, so ids and claim order (vt) still follow the requests, also
    across a chunk with a batch and a reply queue (sent alone) and two domains."""
    bus = CommandBus(pool)
    batch_id = uuid4()
    try:
        await bus.send("orders", "Warmup", uuid4(), {})  # the queues exist: chunks pipeline
        await bus.send("billing", "Warmup", uuid4(), {})
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO commandbus.batch (domain, batch_id) VALUES ('orders', %s)",
                (batch_id,),
            )
        requests = [
            SendRequest("billing" if i % 5 == 0 else "orders", "T", uuid4(), {"i": i})
            for i in range(400)
        ]
        for i in range(200, 210):  # chunk 10 (of 20) names a batch and a reply queue
            requests[i] = SendRequest(
                "orders", "T", uuid4(), {"i": i}, reply_to="orders__replies", batch_id=batch_id
            )
        result = await bus.send_batch(requests, chunk_size=20)
        assert [r.command_id for r in result.results] == [r.command_id for r in requests]
        connections = await fetch(
            pool,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'rcmd bus' AND datname = current_database()",
        )
        assert connections[0][0] >= 2  # statements ran beside each other
    finally:
        await bus.close()
    for domain in ("orders", "billing"):
        sent = [
            (r.command_id, r.msg_id)
            for q, r in zip(requests, result.results, strict=True)
            if q.domain == domain
        ]
        rows = await fetch(
            pool,
            f"SELECT (message->>'command_id')::uuid, msg_id FROM pgmq.q_{domain}__commands"
            " WHERE message->>'command_type' = 'T' ORDER BY vt, msg_id",
        )
        assert rows == sent  # claim order (vt) = msg_id order = request order
    [(total,)] = await fetch(
        pool, "SELECT total_count FROM commandbus.batch WHERE batch_id = %s", batch_id
    )
    assert total == 10


async def test_send_batch_stops_at_a_failing_chunk_and_sends_nothing_after_it(
    pool: AsyncConnectionPool[Any],
) -> None:
    """Chunk 4 of 10 holds a command id already stored: chunks 1-3 stay sent, the chunk
    statement that ran beside chunk 4 is rolled back, and the error says what was sent."""
    bus = CommandBus(pool)
    try:
        taken = uuid4()
        await bus.send("orders", "T", taken, {})
        requests = [SendRequest("orders", "T", uuid4(), {"i": i}) for i in range(50)]
        requests[17] = SendRequest("orders", "T", taken, {"i": 17})
        with pytest.raises(DuplicateCommandError) as info:
            await bus.send_batch(requests, chunk_size=5)
        assert info.value.command_id == str(taken)
        assert "15 of 50 commands were sent" in " ".join(getattr(info.value, "__notes__", []))
    finally:
        await bus.close()
    stored = {r[0] for r in await fetch(pool, "SELECT command_id FROM commandbus.command")}
    assert stored == {taken} | {r.command_id for r in requests[:15]}
    assert await queue_depth(pool, "orders__commands") == 16
    [(audits,)] = await fetch(pool, "SELECT count(*) FROM commandbus.audit")
    assert audits == 16


@pytest.mark.parametrize("connections", [1, 2])
async def test_send_batch_pipeline_moves_on_with_a_small_pool_shared_by_senders(
    pool: AsyncConnectionPool[Any], connections: int
) -> None:
    """Each chunk in flight holds one engine connection, taken before the next chunk starts:
    with a pool of one, or four send_batch calls sharing two connections, every call finishes
    (nothing waits for a connection that an uncommitted chunk of its own call holds)."""
    bus = CommandBus(pool, native_max_connections=connections)
    try:
        await bus.send("orders", "Warmup", uuid4(), {})
        calls = [
            [SendRequest("orders", "T", uuid4(), {"call": c, "i": i}) for i in range(60)]
            for c in range(4)
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*(bus.send_batch(reqs, chunk_size=10) for reqs in calls)), 20
        )
    finally:
        await bus.close()
    for reqs, result in zip(calls, results, strict=True):
        assert [r.command_id for r in result.results] == [r.command_id for r in reqs]
        msg_ids = [r.msg_id for r in result.results]
        assert msg_ids == sorted(msg_ids)  # each call's ids follow its requests
    [(stored,)] = await fetch(pool, "SELECT count(*) FROM commandbus.command")
    assert stored == 1 + 4 * 60
