"""Health of an async `Worker` for container orchestrators: liveness and readiness.

    health = WorkerHealth(worker)     # before worker.run()
    health.live()                     # its event loop turns (and it is not CRITICAL)
    health.ready()                    # it runs, and the database answered recently
    health.status                     # the predecessor's HealthStatus (HEALTHY/DEGRADED/CRITICAL)

Liveness: a heartbeat task on the worker's event loop ticks every `beat_interval` seconds; the
worker is live while its run is on and the last tick is younger than `liveness_timeout` (an
async handler that blocks the loop stops the ticks), and its `HealthStatus` is not CRITICAL.
Readiness: live, not stopping, and the last database check (`SELECT 1` through the worker's
pool, every `check_interval` seconds, `check_timeout` at most) succeeded within
`3 * check_interval`. `status` counts handler successes and failures with the predecessor's
meaning (commandbus.sync.health): DEGRADED after 10 failures in a row, a success resets it.
Every method may be called from any thread (an HTTP endpoint's, e.g. `start_metrics_server(...,
health=health)` serving `/health/live` and `/health/ready`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from commandbus import _db
from commandbus._observe import BaseObserver
from commandbus.sync.health import HealthState, HealthStatus
from commandbus.worker import Worker

if TYPE_CHECKING:
    from commandbus import _native

logger = logging.getLogger(__name__)


class WorkerHealth(BaseObserver):
    """Liveness, readiness and the `HealthStatus` of one async `Worker`."""

    def __init__(
        self,
        worker: Worker,
        *,
        beat_interval: float = 1.0,
        liveness_timeout: float = 30.0,
        check_interval: float = 5.0,
        check_timeout: float = 5.0,
    ) -> None:
        if not isinstance(worker, Worker):
            raise TypeError(
                "WorkerHealth watches an async commandbus.Worker (a SyncWorker has health_status)"
            )
        self._worker = worker
        self._beat_interval = beat_interval
        self._liveness_timeout = liveness_timeout
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self.status = HealthStatus()
        self._last_beat: float | None = None
        self._last_db_ok: float | None = None
        self._db_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._successes = 0
        self._failing = False
        worker.add_observer(self)

    # -- observer hooks (the worker's event loop) ------------------------------------------

    def attach(self, worker: Worker, native: _native.NativeWorker) -> None:
        self._running = True
        self._last_beat = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(
            self._beat(worker), name=f"rcmd-health-{worker.domain}"
        )

    async def detach(self, worker: Worker, native: _native.NativeWorker) -> None:
        self._running = False
        self._publish_successes()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def finished(self, token: Any, outcome_kind: str) -> None:
        # Successes in a row are counted here and added to `status` at the next heartbeat (or
        # failure): `status` takes a lock and reads the clock per record. A success after a
        # failure is recorded at once, as it resets `consecutive_failures`.
        if outcome_kind == "SUCCESS":
            if self._failing:
                self._failing = False
                self.status.record_success()
            else:
                self._successes += 1
        else:  # business-rule failures included, as the predecessor counted them
            self._publish_successes()
            self._failing = True
            self.status.record_failure()

    def _publish_successes(self) -> None:
        n, self._successes = self._successes, 0
        if n:
            self.status.record_success()
            if n > 1:
                with self.status._lock:
                    self.status.total_successes += n - 1

    async def _beat(self, worker: Worker) -> None:
        next_check = 0.0
        while True:
            now = time.monotonic()
            self._last_beat = now
            self._publish_successes()
            if now >= next_check:
                next_check = now + self._check_interval
                await self.check_database()
            await asyncio.sleep(self._beat_interval)

    async def check_database(self) -> bool:
        """Run the readiness query now; True when the database answered in time."""
        try:
            await asyncio.wait_for(_db.fetch_value(self._worker._pool, "ping"), self._check_timeout)
        except Exception as exc:  # TimeoutError, DatabaseError, a closed pool...
            self._db_error = str(exc) or type(exc).__name__
            logger.warning("worker for %s: database check failed: %s", self._worker.domain, exc)
            return False
        self._last_db_ok = time.monotonic()
        self._db_error = None
        return True

    # -- answers (any thread) --------------------------------------------------------------

    def live(self) -> bool:
        """The run is on, its event loop turned within `liveness_timeout`, not CRITICAL."""
        beat = self._last_beat
        return (
            self._running
            and beat is not None
            and time.monotonic() - beat < self._liveness_timeout
            and self.status.state is not HealthState.CRITICAL
        )

    def ready(self) -> bool:
        """Live, not stopping, and the database answered within the last 3 check intervals."""
        ok = self._last_db_ok
        return (
            self.live()
            and self._worker.is_running
            and not self._worker._stop_requested
            and ok is not None
            and time.monotonic() - ok < 3 * self._check_interval
        )

    def to_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        beat, ok = self._last_beat, self._last_db_ok
        return {
            "domain": self._worker.domain,
            "live": self.live(),
            "ready": self.ready(),
            "running": self._running,
            "seconds_since_loop_turn": None if beat is None else round(now - beat, 3),
            "seconds_since_database_ok": None if ok is None else round(now - ok, 3),
            "database_error": self._db_error,
            "in_flight": self._worker.in_flight_count,
            **self.status.to_dict(),
        }

    def http_answer(self, what: str) -> tuple[bool, bytes]:
        """(ok, JSON body) for an HTTP probe: `live`, `ready`, or `health` (both)."""
        ok = self.live() if what == "live" else self.ready()
        return ok, orjson.dumps(self.to_dict())


__all__ = ["WorkerHealth"]
