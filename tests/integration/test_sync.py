"""The sync API (`commandbus.sync`) against a real server, from plain threads only: sends
(plain, batch, inside the caller's transaction), queries and batches, SyncWorker outcomes,
graceful stop, SIGTERM in a subprocess, and the README's Sync API example as written."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from commandbus import (
    BatchCommand,
    BusinessRuleException,
    Command,
    CommandStatus,
    HandlerContext,
    HandlerRegistry,
    PermanentCommandError,
    RetryPolicy,
    SendRequest,
    TransientCommandError,
)
from commandbus.exceptions import DuplicateCommandError, InvalidNameError, ValidationError
from commandbus.sync import HealthState, SyncCommandBus, SyncWorker

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(max_attempts=3, backoff_schedule=[0])


@pytest.fixture
def sync_pool(database_url: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(database_url, min_size=1, max_size=4, open=True) as pool:
        yield pool


@pytest.fixture
def bus(sync_pool: ConnectionPool[Any]) -> Iterator[SyncCommandBus]:
    bus = SyncCommandBus(sync_pool)
    yield bus
    bus.close()


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def status(bus: SyncCommandBus, domain: str, cid: UUID) -> CommandStatus | None:
    meta = bus.get_command(domain, cid)
    return None if meta is None else meta.status


def queue_rows(pool: ConnectionPool[Any], domain: str) -> list[tuple[Any, ...]]:
    with pool.connection() as conn:
        return conn.execute(
            f"SELECT msg_id, read_ct, vt <= now() FROM pgmq.q_{domain}__commands ORDER BY msg_id"
        ).fetchall()


class Running:
    """A SyncWorker run in a plain thread."""

    def __init__(self, worker: SyncWorker, **kwargs: Any) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        kwargs.setdefault("poll_interval", 0.05)
        self.thread = threading.Thread(target=self._run, kwargs=kwargs)
        self.thread.start()
        wait_for(lambda: worker.is_running or not self.thread.is_alive())

    def _run(self, **kwargs: Any) -> None:
        try:
            self.worker.run(**kwargs)
        except BaseException as exc:
            self.error = exc

    def stop(self, timeout: float | None = 5.0) -> None:
        self.worker.stop(timeout)
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


# -- the bus ----------------------------------------------------------------------------


def test_send_batch_queries_and_batches(bus: SyncCommandBus) -> None:
    cid = uuid4()
    result = bus.send("orders", "CreateOrder", cid, {"sku": "A1"}, max_attempts=2)
    assert result.command_id == cid and result.msg_id > 0
    meta = bus.get_command("orders", cid)
    assert meta is not None and meta.status is CommandStatus.PENDING and meta.max_attempts == 2
    assert bus.command_exists("orders", cid) and not bus.command_exists("orders", uuid4())
    assert [e.event_type for e in bus.get_audit_trail(cid)] == ["SENT"]

    reqs = [SendRequest("orders", "CreateOrder", uuid4(), {"n": i}) for i in range(25)]
    sent = bus.send_batch(reqs, chunk_size=10)
    assert sent.total_commands == 25 and sent.chunks_processed == 3
    assert [r.command_id for r in sent.results] == [r.command_id for r in reqs]
    assert len(bus.query_commands(domain="orders", limit=100)) == 26

    created = bus.create_batch(
        "orders", [BatchCommand("CreateOrder", uuid4(), {"n": i}) for i in range(3)], name="b"
    )
    batch = bus.get_batch("orders", created.batch_id)
    assert batch is not None and batch.total_count == 3 and batch.name == "b"
    assert [b.batch_id for b in bus.list_batches("orders")] == [created.batch_id]
    assert len(bus.list_batch_commands("orders", created.batch_id)) == 3


def test_errors_are_ours_with_the_driver_error_as_cause(
    bus: SyncCommandBus, sync_pool: ConnectionPool[Any]
) -> None:
    with pytest.raises(InvalidNameError):
        bus.send("bad domain!", "X", uuid4(), {})
    with pytest.raises(ValidationError):
        bus.send("orders", "X", uuid4(), {"x": object()})
    cid = uuid4()
    bus.send("orders", "X", cid, {})
    with pytest.raises(DuplicateCommandError):
        bus.send("orders", "X", cid, {})
    with sync_pool.connection() as conn:
        with pytest.raises(DuplicateCommandError) as info:
            bus.send("orders", "X", cid, {}, conn=conn)
        assert isinstance(info.value.__cause__, psycopg.Error)
        conn.rollback()
    with pytest.raises(ValidationError):
        bus.send("orders", "X", uuid4(), {}, conn=object())  # type: ignore[arg-type]


def test_send_with_conn_commits_and_rolls_back_with_the_callers_rows(
    bus: SyncCommandBus, sync_pool: ConnectionPool[Any]
) -> None:
    with sync_pool.connection() as conn:
        conn.execute("CREATE TABLE orders_t (id uuid PRIMARY KEY)")
    kept, dropped = uuid4(), uuid4()
    with sync_pool.connection() as conn, conn.transaction():
        conn.execute("INSERT INTO orders_t VALUES (%s)", (kept,))
        bus.send("orders", "CreateOrder", kept, {"sku": "A1"}, conn=conn)
        batch = bus.send_batch(
            [SendRequest("orders", "CreateOrder", uuid4(), {"n": i}) for i in range(3)],
            conn=conn,
        )
    assert batch.total_commands == 3
    with sync_pool.connection() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO orders_t VALUES (%s)", (dropped,))
            bus.send("orders", "CreateOrder", dropped, {"sku": "B2"}, conn=conn)
            assert status(bus, "orders", dropped) is None  # not visible outside the transaction
            raise psycopg.Rollback()
        rows = {r[0] for r in conn.execute("SELECT id FROM orders_t").fetchall()}
    assert rows == {kept}
    assert status(bus, "orders", kept) is CommandStatus.PENDING
    assert all(status(bus, "orders", r.command_id) for r in batch.results)
    assert status(bus, "orders", dropped) is None
    assert len(queue_rows(sync_pool, "orders")) == 4


def test_the_bus_is_used_from_plain_threads_without_asyncio(bus: SyncCommandBus) -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # the caller has no loop, and needs none
    results: list[UUID] = []
    lock = threading.Lock()

    def sender() -> None:
        for _ in range(20):
            r = bus.send("orders", "CreateOrder", uuid4(), {})
            with lock:
                results.append(r.command_id)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 80
    assert len(bus.query_commands(domain="orders", limit=200)) == 80
    bus.close()
    with pytest.raises(RuntimeError, match="closed"):
        bus.send("orders", "CreateOrder", uuid4(), {})


# -- the worker ---------------------------------------------------------------------------


def test_worker_outcomes_retry_tsq_failed_and_health(
    bus: SyncCommandBus, sync_pool: ConnectionPool[Any]
) -> None:
    registry = HandlerRegistry()
    attempts: dict[str, int] = {}
    threads: set[str] = set()

    @registry.handler("orders", "Work")
    def work(cmd: Command, ctx: HandlerContext) -> dict[str, Any] | None:
        threads.add(threading.current_thread().name)
        mode = cmd.data["mode"]
        attempts[mode] = ctx.attempt
        if mode == "flaky" and ctx.attempt == 1:
            raise TransientCommandError("GATEWAY_TIMEOUT", "try again")
        if mode == "bad":
            raise PermanentCommandError("BAD", "never")
        if mode == "rule":
            raise BusinessRuleException("RULE", "no stock")
        return {"mode": mode}

    ids = {m: uuid4() for m in ("ok", "flaky", "bad", "rule")}
    for mode, cid in ids.items():
        bus.send("orders", "Work", cid, {"mode": mode})
    worker = SyncWorker(sync_pool, "orders", registry, retry_policy=FAST)
    running = Running(worker, concurrency=4)
    try:
        expected = {
            "ok": CommandStatus.COMPLETED,
            "flaky": CommandStatus.COMPLETED,
            "bad": CommandStatus.IN_TROUBLESHOOTING_QUEUE,
            "rule": CommandStatus.FAILED,
        }
        wait_for(lambda: all(status(bus, "orders", ids[m]) is s for m, s in expected.items()))
    finally:
        running.stop()
    ok = bus.get_command("orders", ids["ok"])
    assert ok is not None and ok.result == {"mode": "ok"}
    flaky = bus.get_command("orders", ids["flaky"])
    assert flaky is not None and flaky.attempts == 2 and flaky.last_error_code == "GATEWAY_TIMEOUT"
    assert attempts["flaky"] == 2
    assert all(name.startswith("rcmd-orders") for name in threads)  # the handler thread pool
    health = worker.health_status
    assert health.total_successes == 2 and health.total_failures == 3
    assert health.state is HealthState.HEALTHY and health.consecutive_failures <= 3
    assert worker.stats()["applied"] == 5
    assert not worker.is_running


def test_stop_lets_running_handlers_finish_and_releases_unstarted(
    bus: SyncCommandBus, sync_pool: ConnectionPool[Any]
) -> None:
    registry = HandlerRegistry()
    started: list[UUID] = []
    release = threading.Event()

    @registry.handler("orders", "Hold")
    def hold(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        started.append(cmd.command_id)
        release.wait(10)
        return {"held": True}

    ids = [uuid4() for _ in range(6)]
    for cid in ids:
        bus.send("orders", "Hold", cid, {})
    worker = SyncWorker(sync_pool, "orders", registry)
    running = Running(worker, concurrency=2)
    wait_for(lambda: len(started) == 2)
    stopper = threading.Thread(target=running.stop, kwargs={"timeout": 10})
    stopper.start()
    wait_for(lambda: not worker.is_running)
    time.sleep(0.3)
    assert stopper.is_alive()  # stop() waits for the running handlers
    release.set()
    stopper.join(10)
    assert not stopper.is_alive() and running.error is None
    assert len(started) == 2
    for cid in ids:
        meta = bus.get_command("orders", cid)
        assert meta is not None
        if cid in started:
            assert meta.status is CommandStatus.COMPLETED and meta.result == {"held": True}
        else:  # never started: released at once (attempt undone, visible now)
            assert meta.status is CommandStatus.PENDING and meta.attempts == 0
    rows = queue_rows(sync_pool, "orders")
    assert len(rows) == 4 and all(visible for _, _, visible in rows)


def test_stop_from_another_thread_before_and_after_and_stop_from_a_handler(
    bus: SyncCommandBus, sync_pool: ConnectionPool[Any]
) -> None:
    registry = HandlerRegistry()
    worker = SyncWorker(sync_pool, "orders", registry)

    @registry.handler("orders", "Stop")
    def stop_me(cmd: Command, ctx: HandlerContext) -> None:
        worker.stop()  # from a handler thread: only requests the stop

    worker.stop()  # not running: nothing to do
    running = Running(worker, concurrency=2)
    cid = uuid4()
    bus.send("orders", "Stop", cid, {})
    running.thread.join(20)
    assert not running.thread.is_alive() and running.error is None
    assert status(bus, "orders", cid) is CommandStatus.COMPLETED
    # it runs again after a stop
    running = Running(worker, concurrency=1)
    running.stop()


def test_worker_arguments_are_validated(sync_pool: ConnectionPool[Any]) -> None:
    with pytest.raises(ValueError, match="statement_timeout"):
        SyncWorker(sync_pool, "orders", HandlerRegistry(), statement_timeout=30_000)
    with pytest.raises(InvalidNameError):
        SyncWorker(sync_pool, "bad domain!", HandlerRegistry())
    with pytest.raises(RuntimeError, match="registry"):
        SyncWorker(sync_pool, "orders").run()
    with pytest.raises(ValidationError):
        SyncWorker(sync_pool, "orders", HandlerRegistry(), concurrency=0)


def test_sigterm_stops_gracefully(
    bus: SyncCommandBus, sync_pool: ConnectionPool[Any], database_url: str
) -> None:
    cid, waiting = uuid4(), [uuid4() for _ in range(3)]
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("sync_worker_proc.py")), database_url,
         "orders"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        bus.send("orders", "Slow", cid, {})
        assert proc.stdout.readline().strip() == f"STARTED {cid}"
        for w in waiting:  # sent after the worker took its one command: may be claimed
            bus.send("orders", "Slow", w, {})
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "STOPPED", out
    started = {UUID(line.split()[1]) for line in out.splitlines() if line.startswith("STARTED")}
    assert status(bus, "orders", cid) is CommandStatus.COMPLETED
    for w in waiting:
        meta = bus.get_command("orders", w)
        assert meta is not None
        if w in started:
            assert meta.status is CommandStatus.COMPLETED
        else:
            assert meta.status is CommandStatus.PENDING and meta.attempts == 0


# -- the README --------------------------------------------------------------------------


def test_readme_sync_example_runs_as_written(database_url: str) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(". Sync API\n", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    env = {**os.environ, "DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "DebitAccount COMPLETED {'status': 'ok'}" in done.stdout, done.stdout


def test_the_predecessors_readme_worker_arguments_work(
    bus: SyncCommandBus, sync_pool: ConnectionPool[Any]
) -> None:
    """reliable-cmd's README built its SyncWorker with `concurrency=` (a TypeError there) and
    registered a plain def with `@handler` + `register_instance`: both work here."""
    from commandbus import handler

    class PaymentHandlers:
        @handler(domain="payments", command_type="DebitAccount")
        def handle(self, cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
            return {"status": "ok"}

    registry = HandlerRegistry()
    registry.register_instance(PaymentHandlers())
    worker = SyncWorker(
        pool=sync_pool,
        domain="payments",
        registry=registry,
        concurrency=4,
        visibility_timeout=30,
        statement_timeout=25000,
    )
    cid = uuid4()
    bus.send("payments", "DebitAccount", cid, {"account_id": "123", "amount": 100})
    running = Running(worker)  # worker.run(): concurrency from the constructor
    try:
        wait_for(lambda: status(bus, "payments", cid) is CommandStatus.COMPLETED)
    finally:
        running.stop()
