"""Property tests of the public entry points with generated bad input: each is a typed
ValidationError naming the field (the path into the JSON for data), nothing is written (the
database's rows are counted before and after), and a worker still processes the queue after.

Each test runs its examples on one event loop (`asyncio.Runner`) over one database: a
rejected call writes nothing, so the examples do not disturb each other.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID, uuid4

import psycopg
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BatchCommand,
    CommandBus,
    SendRequest,
    TroubleshootingQueue,
    ValidationError,
    Worker,
)
from commandbus._validation import DOMAIN_RE, INT32_MAX, text_problem
from commandbus.exceptions import SerializationError
from commandbus.sync import SyncCommandBus
from fuzz_strategies import (
    SQL_METACHARACTERS,
    BadLeaf,
    examples,
    good_objects,
    good_text,
    planted,
    weird_names,
)

T = TypeVar("T")
DOMAIN = "fuzz"

# Every table a rejected call could write to: the commands, their audit, batches, processes
# and their steps, the queues (how many, and every message ever sent to one: the queue's
# sequence, which a rolled-back send moves too).
_COUNT_SQL = """
SELECT (SELECT count(*) FROM commandbus.command), (SELECT count(*) FROM commandbus.audit),
       (SELECT count(*) FROM commandbus.batch), (SELECT count(*) FROM commandbus.process),
       (SELECT count(*) FROM commandbus.process_audit), (SELECT count(*) FROM pgmq.meta),
       (SELECT coalesce(sum(total_messages), 0) FROM pgmq.metrics_all())
"""


@dataclass
class Harness:
    runner: asyncio.Runner
    pool: AsyncConnectionPool[Any]
    bus: CommandBus
    url: str

    def run(self, coro: Awaitable[T]) -> T:
        return self.runner.run(coro)  # type: ignore[arg-type]

    def counts(self) -> tuple[Any, ...]:
        with psycopg.connect(self.url) as conn:
            row = conn.execute(_COUNT_SQL).fetchone()
        assert row is not None
        return tuple(row)

    def rejects(self, call: Callable[[], Awaitable[Any]]) -> ValidationError:
        """Run `call`, expect a ValidationError, and check nothing was written."""
        before = self.counts()
        with pytest.raises(ValidationError) as info:
            self.run(call())
        assert self.counts() == before, f"{info.value!r} wrote something"
        return info.value


@pytest.fixture
def harness(database_url: str) -> Iterator[Harness]:
    with asyncio.Runner() as runner:

        async def open_pool() -> AsyncConnectionPool[Any]:
            pool = AsyncConnectionPool(database_url, min_size=1, max_size=4, open=False)
            await pool.open()
            return pool

        pool = runner.run(open_pool())
        bus = CommandBus(pool)
        # the domain's queue exists before the examples count the queues
        runner.run(bus.send(DOMAIN, "Warmup", uuid4(), {}))
        h = Harness(runner, pool, bus, database_url)
        try:
            yield h
            _assert_worker_unaffected(h)
        finally:
            runner.run(bus.close())
            runner.run(pool.close())


def _assert_worker_unaffected(h: Harness) -> None:
    """After the fuzzing, a worker claims and completes the queue's commands as usual."""

    async def drain() -> int:
        worker = Worker(h.pool, DOMAIN)
        done = 0
        try:
            while batch := await worker.receive(batch_size=50):
                for received in batch:
                    await worker.complete(received, {"ok": True})
                    done += 1
        finally:
            await worker.close()
        return done

    cids = [uuid4() for _ in range(5)]
    for cid in cids:
        h.run(h.bus.send(DOMAIN, "AfterFuzz", cid, {"n": 1}))
    assert h.run(drain()) >= len(cids)
    for cid in cids:
        meta = h.run(h.bus.get_command(DOMAIN, cid))
        assert meta is not None and meta.status.value == "COMPLETED"


def _check_path(err: ValidationError, expected: str, leaf: BadLeaf) -> None:
    assert isinstance(err, SerializationError), err
    if leaf.reason == "nested deeper":
        assert err.field.startswith(expected), (err.field, expected)
    else:
        assert err.field == expected, (err.field, expected)


# -- data: every entry point that takes JSON ----------------------------------------------

ENTRY_POINTS = [
    "send",
    "send_conn",
    "send_batch",
    "send_batch_conn",
    "create_batch",
    "create_batch_custom_data",
    "operator_complete",
]


@examples(40)
@given(case=planted(), entry=st.sampled_from(ENTRY_POINTS))
def test_bad_json_is_rejected_by_path_and_writes_nothing(
    harness: Harness, case: tuple[dict[str, Any], str, BadLeaf], entry: str
) -> None:
    value, path, leaf = case
    bus, pool = harness.bus, harness.pool

    async def in_transaction(fn: Callable[[Any], Awaitable[Any]]) -> None:
        async with pool.connection() as conn, conn.transaction():
            await fn(conn)

    good = SendRequest(DOMAIN, "Good", uuid4(), {"ok": 1})
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "send": lambda: bus.send(DOMAIN, "T", uuid4(), value),
        "send_conn": lambda: in_transaction(
            lambda c: bus.send(DOMAIN, "T", uuid4(), value, conn=c)
        ),
        # the bad request is the last one: the good one before it must not be written either
        "send_batch": lambda: bus.send_batch([good, SendRequest(DOMAIN, "T", uuid4(), value)]),
        "send_batch_conn": lambda: in_transaction(
            lambda c: bus.send_batch([good, SendRequest(DOMAIN, "T", uuid4(), value)], conn=c)
        ),
        "create_batch": lambda: bus.create_batch(
            DOMAIN, [BatchCommand("Good", uuid4(), {}), BatchCommand("T", uuid4(), value)]
        ),
        "create_batch_custom_data": lambda: bus.create_batch(
            DOMAIN, [BatchCommand("Good", uuid4(), {})], custom_data=value
        ),
        "operator_complete": lambda: TroubleshootingQueue(pool).operator_complete(
            DOMAIN, uuid4(), value
        ),
    }
    field = {"create_batch_custom_data": "custom_data", "operator_complete": "result_data"}
    expected = path.replace("data", field.get(entry, "data"), 1)
    _check_path(harness.rejects(calls[entry]), expected, leaf)


@examples(20)
@given(case=planted())
def test_sync_api_rejects_bad_json(
    harness: Harness, case: tuple[dict[str, Any], str, BadLeaf]
) -> None:
    value, path, leaf = case
    sync_bus = _sync_bus(harness)
    before = harness.counts()
    with pytest.raises(ValidationError) as info:
        sync_bus.send(DOMAIN, "T", uuid4(), value)
    _check_path(info.value, path, leaf)
    with psycopg.connect(harness.url) as conn, pytest.raises(ValidationError) as info:
        sync_bus.send(DOMAIN, "T", uuid4(), value, conn=conn)
    _check_path(info.value, path, leaf)
    with pytest.raises(ValidationError) as info:
        sync_bus.create_batch(DOMAIN, [BatchCommand("T", uuid4(), value)])
    _check_path(info.value, path, leaf)
    assert harness.counts() == before


_SYNC_BUSES: dict[str, SyncCommandBus] = {}


def _sync_bus(h: Harness) -> SyncCommandBus:
    """One SyncCommandBus per database (closed by the fixture below)."""
    bus = _SYNC_BUSES.get(h.url)
    if bus is None:
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool(h.url, min_size=1, max_size=2)
        bus = _SYNC_BUSES[h.url] = SyncCommandBus(pool)
        bus._fuzz_pool = pool  # type: ignore[attr-defined]
    return bus


@pytest.fixture(autouse=True)
def _close_sync_buses() -> Iterator[None]:
    yield
    while _SYNC_BUSES:
        _, bus = _SYNC_BUSES.popitem()
        bus.close()
        bus._fuzz_pool.close()  # type: ignore[attr-defined]


# -- names, ids and numbers ----------------------------------------------------------------

wrong_types = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.just(object()),
)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _acceptable(arg: str, value: Any) -> bool:
    """Whether `value` is a valid `arg` (the generator also makes good ones)."""
    storable = _is_str(value) and text_problem(value) is None
    match arg:
        case "domain":
            return _is_str(value) and bool(DOMAIN_RE.fullmatch(value)) and "__" not in value \
                and len(value) <= 37  # fmt: skip
        case "command_type":
            # no C0/C1 control characters (a soft hyphen or a format character is fine)
            return storable and 0 < len(value) <= 255 and not _CONTROL.search(value)
        case "reply_to":
            return value is None or (
                _is_str(value) and bool(DOMAIN_RE.fullmatch(value)) and len(value) <= 47
            )
        case "name" | "operator":
            return value is None or storable
        case "reason":
            return storable
        case "max_attempts":
            return value is None or (type(value) is int and 1 <= value <= INT32_MAX)
        case "data":
            return isinstance(value, dict)
        case "correlation_id" | "batch_id":
            return value is None
    return False


@examples(60)
@given(
    arg=st.sampled_from(
        [
            "domain",
            "command_type",
            "command_id",
            "correlation_id",
            "reply_to",
            "max_attempts",
            "batch_id",
            "data",
            "name",
            "operator",
            "reason",
        ]
    ),
    bad=st.one_of(weird_names, wrong_types, st.integers(-(2**70), 0), st.integers(2**31, 2**70)),
)
def test_bad_arguments_are_named_and_write_nothing(harness: Harness, arg: str, bad: Any) -> None:
    assume(not _acceptable(arg, bad))
    bus, pool = harness.bus, harness.pool
    kwargs: dict[str, Any] = {
        "domain": DOMAIN, "command_type": "T", "command_id": uuid4(), "data": {},
    }  # fmt: skip
    tsq = TroubleshootingQueue(pool)
    call: Callable[[], Awaitable[Any]]
    if arg == "name":
        call = lambda: bus.create_batch(DOMAIN, [BatchCommand("T", uuid4(), {})], name=bad)  # noqa: E731
    elif arg == "operator":
        call = lambda: tsq.operator_retry(DOMAIN, uuid4(), operator=bad)  # noqa: E731
    elif arg == "reason":
        call = lambda: tsq.operator_cancel(DOMAIN, uuid4(), bad)  # noqa: E731
    else:
        kwargs[arg] = bad
        call = lambda: bus.send(**kwargs)  # noqa: E731
    err = harness.rejects(call)
    assert err.field == arg, (err.field, arg, bad)


@examples(30)
@given(
    command_type=st.one_of(good_text, st.sampled_from(SQL_METACHARACTERS)).filter(
        lambda s: bool(s) and s.isprintable()
    ),
    data=good_objects,
    name=st.one_of(good_text, st.sampled_from(SQL_METACHARACTERS)),
)
def test_weird_but_valid_input_round_trips(
    harness: Harness, command_type: str, data: dict[str, Any], name: str
) -> None:
    """SQL metacharacters and any Unicode PostgreSQL can store are data, stored as sent."""
    bus = harness.bus
    cid = uuid4()
    harness.run(bus.send(DOMAIN, command_type, cid, data))
    created = harness.run(
        bus.create_batch(DOMAIN, [BatchCommand(command_type, uuid4(), data)], name=name)
    )

    async def stored(command_id: UUID) -> tuple[str, Any]:
        async with harness.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT c.command_type, q.message->'data' FROM commandbus.command c"
                f" JOIN pgmq.q_{DOMAIN}__commands q ON q.msg_id = c.msg_id"
                " WHERE c.domain = %s AND c.command_id = %s",
                (DOMAIN, command_id),
            )
            row = await cur.fetchone()
            assert row is not None
            return row[0], row[1]

    for command_id in (cid, created.command_results[0].command_id):
        stored_type, stored_data = harness.run(stored(command_id))
        assert stored_type == command_type
        assert _same_json(data, stored_data), (data, stored_data)
    batch = harness.run(bus.get_batch(DOMAIN, created.batch_id))
    assert batch is not None and batch.name == name


def _same_json(sent: Any, got: Any) -> bool:
    """JSON equality as JSONB keeps it: a number is its decimal value, so a float whose
    shortest form has an exponent (6.285543194564317e16) comes back as the integer of the
    same decimal (62855431945643170), which converts back to the same float."""
    if isinstance(sent, float):
        return isinstance(got, int | float) and float(got) == sent
    if isinstance(sent, dict):
        return (
            isinstance(got, dict)
            and sent.keys() == got.keys()
            and all(_same_json(v, got[k]) for k, v in sent.items())
        )
    if isinstance(sent, list):
        return (
            isinstance(got, list)
            and len(sent) == len(got)
            and all(_same_json(a, b) for a, b in zip(sent, got, strict=True))
        )
    return type(sent) is type(got) and bool(sent == got)


# -- what a handler returns or raises ---------------------------------------------------------


async def test_handler_output_postgresql_cannot_store_does_not_stop_the_worker(
    pool: AsyncConnectionPool[Any],
) -> None:
    """A result with NaN goes to the TSQ naming its path (it would be stored as null); an
    error text with a NUL or a lone surrogate is stored escaped (it used to fail the flush, and
    with it every outcome of the flush). The worker goes on with the other commands."""
    from commandbus import HandlerRegistry, PermanentCommandError

    reg = HandlerRegistry()

    @reg.handler(DOMAIN, "NanResult")
    async def nan_result(cmd: Any, ctx: Any) -> dict[str, Any]:
        return {"total": [1.0, math.nan]}

    @reg.handler(DOMAIN, "NulError")
    async def nul_error(cmd: Any, ctx: Any) -> None:
        raise PermanentCommandError("E\x00", "bad\x00text \ud800", {"d": "x\x00y", "n": math.inf})

    @reg.handler(DOMAIN, "Crash")
    async def crash(cmd: Any, ctx: Any) -> None:
        raise ValueError("nul \x00 and \udcff in an exception")

    @reg.handler(DOMAIN, "Ok")
    async def ok(cmd: Any, ctx: Any) -> dict[str, Any]:
        return {"n": cmd.data["n"]}

    bus = CommandBus(pool)
    special = {t: uuid4() for t in ("NanResult", "NulError", "Crash")}
    for t, cid in special.items():
        await bus.send(DOMAIN, t, cid, {}, max_attempts=1)
    oks = [uuid4() for _ in range(50)]
    await bus.send_batch([SendRequest(DOMAIN, "Ok", c, {"n": i}) for i, c in enumerate(oks)])
    worker = Worker(pool, DOMAIN, reg, visibility_timeout=30)
    task = asyncio.create_task(worker.run(concurrency=8, poll_interval=0.1))
    try:

        async def all_done() -> bool:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM commandbus.command WHERE domain = %s"
                    " AND status IN ('COMPLETED', 'IN_TROUBLESHOOTING_QUEUE')",
                    (DOMAIN,),
                )
                row = await cur.fetchone()
                return row is not None and row[0] == len(oks) + len(special)

        from itest_helpers import wait_until

        await wait_until(all_done, timeout=30)
    finally:
        await worker.stop(5)
        await task
        await bus.close()
    for cid in oks:
        meta = await bus.get_command(DOMAIN, cid)
        assert meta is not None and meta.status.value == "COMPLETED"
    nan = await bus.get_command(DOMAIN, special["NanResult"])
    assert nan is not None and nan.status.value == "IN_TROUBLESHOOTING_QUEUE"
    assert nan.last_error_code == "RESULT_NOT_SERIALIZABLE"
    assert "result['total'][1]" in (nan.last_error_msg or "")
    nul = await bus.get_command(DOMAIN, special["NulError"])
    assert nul is not None and nul.status.value == "IN_TROUBLESHOOTING_QUEUE"
    assert (nul.last_error_code, nul.last_error_msg) == ("E\\x00", "bad\\x00text \\ud800")
    crashed = await bus.get_command(DOMAIN, special["Crash"])
    assert crashed is not None and crashed.status.value == "IN_TROUBLESHOOTING_QUEUE"
    assert crashed.last_error_msg == "nul \\x00 and \\udcff in an exception"


# -- process data ----------------------------------------------------------------------------


async def test_a_process_state_postgresql_cannot_store_is_rejected_before_any_write(
    pool: AsyncConnectionPool[Any],
) -> None:
    """A process's state is stored as JSONB: a NaN in it (json.dumps wrote `NaN`, which
    PostgreSQL rejects as a DatabaseError) or a NUL is a SerializationError naming its path,
    and the start writes nothing (no process row, no step, no command)."""
    from enum import StrEnum

    from commandbus.process import BaseProcessManager, PostgresProcessRepository, ProcessCommand

    class Step(StrEnum):
        ONLY = "ONLY"

    class Saga(BaseProcessManager[dict[str, Any], Step]):
        process_type = "Saga"  # type: ignore[assignment]
        domain = DOMAIN  # type: ignore[assignment]
        state_class = dict  # type: ignore[assignment]

        def create_initial_state(self, initial_data: dict[str, Any]) -> dict[str, Any]:
            return dict(initial_data)

        def get_first_step(self, state: dict[str, Any]) -> Step:
            return Step.ONLY

        async def build_command(self, step: Step, state: dict[str, Any]) -> ProcessCommand[Any]:
            return ProcessCommand(command_type="Only", data={})

        def update_state(self, state: dict[str, Any], step: Step, reply: Any) -> None:
            return None

        def get_next_step(self, current_step: Step, reply: Any, state: dict[str, Any]) -> None:
            return None

    bus = CommandBus(pool)
    saga = Saga(bus, PostgresProcessRepository(pool), f"{DOMAIN}__process_replies", pool)

    async def counts() -> tuple[Any, ...]:
        async with pool.connection() as conn:
            cur = await conn.execute(_COUNT_SQL)
            row = await cur.fetchone()
            assert row is not None
            return tuple(row)

    await saga.start({"ok": 1})  # the queues exist: what follows must add nothing
    before = await counts()
    for data, field, reason in (
        ({"order": {"amount": math.nan}}, "state['order']['amount']", "NaN"),
        ({"note": "a\x00b"}, "state['note']", "NUL"),
        ({"tags": ["ok", "\udc00"]}, "state['tags'][1]", "surrogate"),
    ):
        with pytest.raises(SerializationError) as info:
            await saga.start(data)
        assert info.value.field == field and reason in info.value.reason
    assert await counts() == before
    await bus.close()
