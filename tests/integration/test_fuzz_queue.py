"""Malformed messages written straight into a command queue (not JSON objects, missing keys,
wrong types, huge): the claim moves each to the troubleshooting queue with a reason
(MALFORMED_MESSAGE) and archives it, in the same claim that hands out the good commands
around it, and the worker keeps its pace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, HandlerRegistry, SendRequest, Worker
from fuzz_strategies import examples, good_chars, good_json, good_text

DOMAIN = "fuzzq"
QUEUE = f"{DOMAIN}__commands"

# Fresh ids, not st.uuids(): Hypothesis repeats its ids across examples, and a message naming
# a command that exists is another case (test_a_message_naming_an_existing_command_...).
fresh_ids = st.builds(uuid4)
command_ids = st.one_of(
    good_json,
    fresh_ids.map(str),  # a valid id without a command row
    fresh_ids.map(lambda u: u.hex),  # PostgreSQL's uuid input takes these forms too
    fresh_ids.map(lambda u: "{" + str(u).upper() + "}"),
    fresh_ids.map(lambda u: str(u)[:-1] + "g"),
    st.text(alphabet=good_chars, max_size=40),
)

malformed_messages = st.one_of(
    good_json.filter(lambda v: not isinstance(v, dict)),  # not an object
    st.dictionaries(good_text, good_json, max_size=4),  # keys missing
    st.fixed_dictionaries(
        {"command_id": command_ids},
        optional={
            "domain": good_json,
            "command_type": st.one_of(
                good_json, st.text(alphabet=good_chars, min_size=3000, max_size=5000)
            ),
            "correlation_id": good_json,
            "reply_to": good_json,
            "data": good_json,
        },
    ),
    # huge: about 2 MB of data under a valid but unknown id
    st.builds(lambda: {"command_id": str(uuid4()), "data": {"blob": "x" * 2_000_000}}),
)


async def _write_raw(pool: AsyncConnectionPool[Any], message: Any) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(message)))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def _outcome_of(pool: AsyncConnectionPool[Any], msg_id: int) -> tuple[Any, ...]:
    """(in the queue, archived, status and error code of the row holding msg_id, reasons of
    its MOVED_TO_TSQ audit rows)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT (SELECT count(*) FROM pgmq.q_{QUEUE} WHERE msg_id = %(m)s),"
            f" (SELECT count(*) FROM pgmq.a_{QUEUE} WHERE msg_id = %(m)s),"
            " c.status, c.last_error_code,"
            " (SELECT array_agg(a.details_json->>'reason') FROM commandbus.audit a"
            "   WHERE a.command_id = c.command_id AND a.event_type = 'MOVED_TO_TSQ')"
            " FROM (SELECT 1) one LEFT JOIN commandbus.command c"
            "   ON c.domain = %(d)s AND c.msg_id = %(m)s",
            {"m": msg_id, "d": DOMAIN},
        )
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)


@pytest.fixture
def loop_and_pool(database_url: str) -> Iterator[tuple[asyncio.Runner, AsyncConnectionPool[Any]]]:
    with asyncio.Runner() as runner:

        async def open_pool() -> AsyncConnectionPool[Any]:
            pool = AsyncConnectionPool(database_url, min_size=1, max_size=4, open=False)
            await pool.open()
            return pool

        pool = runner.run(open_pool())
        try:
            yield runner, pool
        finally:
            runner.run(pool.close())


@examples(25)
@given(messages=st.lists(malformed_messages, min_size=1, max_size=4))
def test_malformed_messages_go_to_the_tsq_in_the_claim_that_meets_them(
    loop_and_pool: tuple[asyncio.Runner, AsyncConnectionPool[Any]], messages: list[Any]
) -> None:
    runner, pool = loop_and_pool

    async def scenario() -> None:
        bus = CommandBus(pool)
        worker = Worker(pool, DOMAIN)
        try:
            good: list[UUID] = []
            bad: list[int] = []
            for message in messages:  # good and malformed interleaved in queue order
                cid = uuid4()
                await bus.send(DOMAIN, "Good", cid, {"n": 1})
                good.append(cid)
                bad.append(await _write_raw(pool, message))
            # One claim of everything: the good commands come out, the rest is sorted out.
            received = await worker.receive(batch_size=2 * len(messages) + 1)
            assert sorted(r.command.command_id for r in received) == sorted(good)
            for r in received:
                await worker.complete(r)
            for msg_id in bad:
                in_queue, archived, status, code, reasons = await _outcome_of(pool, msg_id)
                assert (in_queue, archived) == (0, 1), msg_id
                assert (status, code) == ("IN_TROUBLESHOOTING_QUEUE", "MALFORMED_MESSAGE")
                assert reasons == ["MALFORMED_MESSAGE"]
            assert await worker.receive(batch_size=10) == []
        finally:
            await worker.close()
            await bus.close()

    runner.run(scenario())


async def test_a_message_naming_an_existing_command_is_archived_and_the_command_untouched(
    pool: AsyncConnectionPool[Any],
) -> None:
    """A second message for a command that exists (a copy, or a hand-written message) is not
    that command's message: it is archived, and the command keeps its own."""
    bus = CommandBus(pool)
    cid = uuid4()
    await bus.send(DOMAIN, "Good", cid, {"n": 1})
    copy = await _write_raw(pool, {"command_id": str(cid), "command_type": "Good", "data": {}})
    worker = Worker(pool, DOMAIN)
    try:
        [received] = await worker.receive(batch_size=10)
        assert received.command.command_id == cid and received.msg_id != copy
        await worker.complete(received)
    finally:
        await worker.close()
        await bus.close()
    in_queue, archived, status, _code, _reasons = await _outcome_of(pool, copy)
    assert (in_queue, archived, status) == (0, 1, None)
    meta = await bus.get_command(DOMAIN, cid)
    assert meta is not None and meta.status.value == "COMPLETED"


async def _run_until_done(
    pool: AsyncConnectionPool[Any], cids: list[UUID], *, visibility_timeout: int
) -> float:
    """Seconds a running worker takes to complete `cids` (from start to the last one)."""
    reg = HandlerRegistry()
    done: set[UUID] = set()
    finished = asyncio.Event()

    @reg.handler(DOMAIN, "Good")
    async def good(cmd: Any, ctx: Any) -> None:
        done.add(cmd.command_id)
        if len(done) == len(cids):
            finished.set()

    worker = Worker(pool, DOMAIN, reg, visibility_timeout=visibility_timeout)
    start = time.monotonic()
    task = asyncio.create_task(worker.run(concurrency=16, poll_interval=0.05))
    try:
        await asyncio.wait_for(finished.wait(), timeout=60)
        return time.monotonic() - start
    finally:
        await worker.stop(5)
        await task


async def test_the_worker_keeps_its_pace_among_malformed_messages(
    pool: AsyncConnectionPool[Any],
) -> None:
    """The same number of good commands, alone and with as many malformed messages between
    them: all done well inside one visibility timeout (no malformed message is left to wait out
    a lease, nor blocks the claim), in a time comparable to the run without them."""
    bus = CommandBus(pool)
    n = 300
    baseline_ids = [uuid4() for _ in range(n)]
    await bus.send_batch(
        [SendRequest(DOMAIN, "Good", c, {"i": i}) for i, c in enumerate(baseline_ids)]
    )
    baseline = await _run_until_done(pool, baseline_ids, visibility_timeout=30)

    def samples(i: int) -> Any:
        return [
            [1, 2],
            "text",
            None,
            {},
            {"command_id": 5},
            {"command_id": "not-a-uuid", "command_type": {"x": 1}},
            {"command_id": str(uuid4()), "command_type": "x" * 4000, "data": [1]},
            {"command_id": None, "data": "y" * 100_000},
        ][i % 8]

    mixed_ids = [uuid4() for _ in range(n)]
    for i, cid in enumerate(mixed_ids):
        await bus.send(DOMAIN, "Good", cid, {"i": i})
        await _write_raw(pool, samples(i))
    mixed = await _run_until_done(pool, mixed_ids, visibility_timeout=30)
    await bus.close()

    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM commandbus.command WHERE domain = %s"
            " AND last_error_code = 'MALFORMED_MESSAGE'",
            (DOMAIN,),
        )
        row = await cur.fetchone()
        cur = await conn.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE}")
        left = await cur.fetchone()
    assert row is not None and row[0] == n
    assert left is not None and left[0] == 0
    assert mixed < 15, f"{mixed:.1f}s: a malformed message waited out a lease"
    assert mixed < 3 * baseline + 2, f"mixed {mixed:.2f}s against {baseline:.2f}s alone"
