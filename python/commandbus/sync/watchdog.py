"""WorkerWatchdog: a daemon thread that checks a worker's `HealthStatus` every
`check_interval` seconds, as in the predecessor (`reliable-cmd` 0.2.2): CRITICAL triggers the
recovery once (`restart_callback()`, or without one `worker.stop(timeout=30)`: the
predecessor's stop waited 30 s for running handlers by default, while `SyncWorker.stop()`
without a timeout waits for them without limit, which a stuck handler would make forever);
DEGRADED is only logged."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from commandbus.sync.health import HealthStatus

logger = logging.getLogger(__name__)

#: How long the default recovery lets running handlers finish (the predecessor's stop default).
RECOVERY_STOP_TIMEOUT_S = 30.0


class Watchable(Protocol):
    """What the watchdog watches: a `health_status` and a `stop(timeout)`."""

    @property
    def health_status(self) -> HealthStatus: ...

    def stop(self, timeout: float | None = None) -> None: ...


class WorkerWatchdog:
    """Monitors a worker's health from a daemon thread.

    Example:
        watchdog = WorkerWatchdog(worker, check_interval=10.0)
        watchdog.start()
        try:
            worker.run(concurrency=4)
        finally:
            watchdog.stop()
    """

    def __init__(
        self,
        worker: Watchable,
        *,
        check_interval: float = 10.0,
        restart_callback: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> None:
        self._worker = worker
        self._check_interval = check_interval
        self._restart_callback = restart_callback
        self._name = name or "worker-watchdog"
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._recovery_triggered = False

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def recovery_triggered(self) -> bool:
        """True once the recovery ran (it runs at most once per `start()`)."""
        return self._recovery_triggered

    def start(self) -> None:
        """Start checking (a daemon thread: it never keeps the process alive)."""
        if self.is_running:
            logger.warning("watchdog %r already running", self._name)
            return
        self._stop_event.clear()
        self._recovery_triggered = False
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()
        logger.info("watchdog %r started (every %ss)", self._name, self._check_interval)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop checking; wait up to `timeout` seconds for the thread to end."""
        thread = self._thread
        if thread is None:
            return
        self._stop_event.set()
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=timeout)
            if thread.is_alive():
                logger.warning("watchdog %r did not stop within %ss", self._name, timeout)
        self._thread = None

    def _loop(self) -> None:
        while not self._stop_event.wait(timeout=self._check_interval):
            try:
                self._check_health()
            except Exception:
                logger.exception("watchdog %r: health check failed", self._name)

    def _check_health(self) -> None:
        status = self._worker.health_status
        if status.is_critical:
            logger.error(
                "watchdog %r: worker CRITICAL (stuck_threads=%d, pool_exhaustions=%d, "
                "consecutive_failures=%d)",
                self._name,
                status.stuck_threads,
                status.pool_exhaustions,
                status.consecutive_failures,
            )
            self._trigger_recovery()
        elif status.is_degraded:
            logger.warning(
                "watchdog %r: worker DEGRADED (consecutive_failures=%d)",
                self._name,
                status.consecutive_failures,
            )
        else:
            logger.debug("watchdog %r: worker healthy", self._name)

    def _trigger_recovery(self) -> None:
        if self._recovery_triggered:
            logger.warning("watchdog %r: recovery already triggered", self._name)
            return
        self._recovery_triggered = True
        logger.warning("watchdog %r: triggering recovery", self._name)
        try:
            if self._restart_callback is not None:
                self._restart_callback()
            else:
                self._worker.stop(timeout=RECOVERY_STOP_TIMEOUT_S)
        except Exception:
            logger.exception("watchdog %r: recovery failed", self._name)


__all__ = ["Watchable", "WorkerWatchdog"]
