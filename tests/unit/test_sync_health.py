"""commandbus.sync's HealthStatus, WorkerWatchdog and timeout helpers: the predecessor's
(reliable-cmd 0.2.2) names, thresholds and rules."""

from __future__ import annotations

import threading
import time

import pytest
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from commandbus.sync import (
    HealthState,
    HealthStatus,
    TimeoutConfig,
    WorkerWatchdog,
    create_pool_with_timeout,
    is_pool_timeout,
    is_query_cancelled,
    is_timeout_error,
    validate_timeouts,
)


def test_health_states_and_thresholds() -> None:
    h = HealthStatus()
    assert h.state is HealthState.HEALTHY and h.is_healthy
    for _ in range(9):
        h.record_failure(RuntimeError("x"))
    assert h.is_healthy
    h.record_failure()
    assert h.state is HealthState.DEGRADED and h.is_degraded
    h.record_success()
    assert h.is_healthy and h.consecutive_failures == 0 and h.last_success is not None
    assert (h.total_successes, h.total_failures) == (1, 10)
    h.record_stuck_thread()
    h.record_stuck_thread()
    assert h.is_healthy
    h.record_stuck_thread()
    assert h.is_critical
    h.reset_stuck_threads()
    assert h.is_healthy
    for _ in range(5):
        h.record_pool_exhaustion()
    assert h.is_critical
    h.reset_pool_exhaustions()
    assert h.is_healthy
    for _ in range(10):
        h.record_failure()
    h.record_stuck_thread()
    h.reset()
    assert h.is_healthy and h.stuck_threads == 0 and h.total_failures == 20
    d = h.to_dict()
    assert d["state"] == "HEALTHY" and d["total_successes"] == 1
    assert set(d) == {"state", "last_success", "consecutive_failures", "stuck_threads",
                      "pool_exhaustions", "total_successes", "total_failures"}  # fmt: skip


def test_health_counts_from_many_threads() -> None:
    h = HealthStatus()

    def hammer() -> None:
        for _ in range(1000):
            h.record_success()
            h.record_failure()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.total_successes == h.total_failures == 4000


def test_timeout_config_and_validation() -> None:
    c = TimeoutConfig()
    c.validate()
    assert (c.statement_timeout_ms, c.visibility_timeout_s, c.pool_timeout_s,
            c.watchdog_interval_s) == (25_000, 30, 30.0, 10.0)  # fmt: skip
    assert c.statement_timeout_s == 25.0 and c.stuck_threshold_s == 35.0
    validate_timeouts(25_000, 30)
    validate_timeouts(29_999, 30)
    with pytest.raises(ValueError, match="less than"):
        validate_timeouts(30_000, 30)
    for bad in (
        TimeoutConfig(statement_timeout_ms=0),
        TimeoutConfig(visibility_timeout_s=-1),
        TimeoutConfig(pool_timeout_s=0),
        TimeoutConfig(watchdog_interval_s=0),
    ):
        with pytest.raises(ValueError, match="positive"):
            bad.validate()


def test_timeout_predicates() -> None:
    cancelled = pg_errors.QueryCanceled("canceling statement due to statement timeout")
    pool_timeout = PoolTimeout("no connection")
    assert is_query_cancelled(cancelled) and not is_query_cancelled(pool_timeout)
    assert is_pool_timeout(pool_timeout) and not is_pool_timeout(cancelled)
    assert is_timeout_error(cancelled) and is_timeout_error(pool_timeout)
    assert not is_timeout_error(RuntimeError("x"))


def test_create_pool_with_timeout_sizes() -> None:
    pool = create_pool_with_timeout("dbname=nowhere", min_size=3, timeout=5.0, open=False)
    assert isinstance(pool, ConnectionPool)
    assert (pool.min_size, pool.max_size, pool.timeout) == (3, 6, 5.0)
    pool = create_pool_with_timeout("dbname=nowhere", min_size=2, max_size=3, open=False)
    assert (pool.max_size, pool.timeout) == (3, 30.0)


class _FakeWorker:
    def __init__(self) -> None:
        self.health_status = HealthStatus()
        self.stopped = threading.Event()
        self.timeout: float | None = None

    def stop(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.stopped.set()


def test_watchdog_stops_a_critical_worker_once() -> None:
    worker = _FakeWorker()
    dog = WorkerWatchdog(worker, check_interval=0.01)
    dog.start()
    try:
        assert dog.is_running
        for _ in range(10):
            worker.health_status.record_failure()  # DEGRADED: logged only
        time.sleep(0.05)
        assert not worker.stopped.is_set() and not dog.recovery_triggered
        for _ in range(3):
            worker.health_status.record_stuck_thread()
        assert worker.stopped.wait(2)
        assert dog.recovery_triggered
        assert worker.timeout == 30.0  # bounded: a stuck handler must not hang the recovery
    finally:
        dog.stop()
    assert not dog.is_running


def test_watchdog_calls_the_restart_callback_instead() -> None:
    worker = _FakeWorker()
    called = threading.Event()
    dog = WorkerWatchdog(worker, check_interval=0.01, restart_callback=called.set, name="wd")
    for _ in range(5):
        worker.health_status.record_pool_exhaustion()
    dog.start()
    try:
        assert called.wait(2)
        assert not worker.stopped.is_set()
    finally:
        dog.stop()


def test_statement_timeout_goes_into_the_engines_connection_options() -> None:
    from commandbus._dsn import native_dsn
    from commandbus.sync.worker import _with_statement_timeout

    dsn = native_dsn(_with_statement_timeout("host=h dbname=d options='-c work_mem=4MB'", 25_000))
    assert dsn == "postgresql://h/d?options=-c+work_mem%3D4MB+-c+statement_timeout%3D25000"
