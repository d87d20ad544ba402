"""Health of a `SyncWorker`: counters its handlers update, and the state they add up to.

The meaning is the predecessor's (`reliable-cmd` 0.2.2): CRITICAL when `stuck_threads` reaches
`STUCK_THRESHOLD` (3) or `pool_exhaustions` reaches `EXHAUSTION_THRESHOLD` (5); else DEGRADED
when `consecutive_failures` reaches `FAILURE_THRESHOLD` (10); else HEALTHY. A success resets
`consecutive_failures`. Every method is thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, auto
from typing import Any


class HealthState(Enum):
    """HEALTHY: working normally. DEGRADED: handlers keep failing. CRITICAL: handlers stuck or
    the connection pool exhausted; a `WorkerWatchdog` acts on it."""

    HEALTHY = auto()
    DEGRADED = auto()
    CRITICAL = auto()


@dataclass
class HealthStatus:
    """Thread-safe health counters of a worker and the state derived from them."""

    FAILURE_THRESHOLD: int = 10
    STUCK_THRESHOLD: int = 3
    EXHAUSTION_THRESHOLD: int = 5

    state: HealthState = HealthState.HEALTHY
    last_success: datetime | None = None
    consecutive_failures: int = 0
    stuck_threads: int = 0
    pool_exhaustions: int = 0
    total_successes: int = 0
    total_failures: int = 0

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_success(self) -> None:
        """A handler succeeded: `consecutive_failures` back to 0."""
        with self._lock:
            self.last_success = datetime.now(UTC)
            self.consecutive_failures = 0
            self.total_successes += 1
            self._evaluate()

    def record_failure(self, error: BaseException | None = None) -> None:
        """A handler failed (any error, business-rule ones included, as in the predecessor)."""
        with self._lock:
            self.consecutive_failures += 1
            self.total_failures += 1
            self._evaluate()

    def record_stuck_thread(self) -> None:
        """A handler has been running longer than the visibility timeout plus 5 s."""
        with self._lock:
            self.stuck_threads += 1
            self._evaluate()

    def record_pool_exhaustion(self) -> None:
        """A handler timed out waiting for a connection of a psycopg pool (`PoolTimeout`)."""
        with self._lock:
            self.pool_exhaustions += 1
            self._evaluate()

    def reset_stuck_threads(self) -> None:
        with self._lock:
            self.stuck_threads = 0
            self._evaluate()

    def reset_pool_exhaustions(self) -> None:
        with self._lock:
            self.pool_exhaustions = 0
            self._evaluate()

    def reset(self) -> None:
        """Back to HEALTHY with the current counters at 0 (totals and last_success kept)."""
        with self._lock:
            self.state = HealthState.HEALTHY
            self.consecutive_failures = 0
            self.stuck_threads = 0
            self.pool_exhaustions = 0

    def _evaluate(self) -> None:
        # called with the lock held
        if (
            self.stuck_threads >= self.STUCK_THRESHOLD
            or self.pool_exhaustions >= self.EXHAUSTION_THRESHOLD
        ):
            self.state = HealthState.CRITICAL
        elif self.consecutive_failures >= self.FAILURE_THRESHOLD:
            self.state = HealthState.DEGRADED
        else:
            self.state = HealthState.HEALTHY

    def to_dict(self) -> dict[str, Any]:
        """The state (by name) and counters, for metrics and health endpoints."""
        with self._lock:
            return {
                "state": self.state.name,
                "last_success": self.last_success.isoformat() if self.last_success else None,
                "consecutive_failures": self.consecutive_failures,
                "stuck_threads": self.stuck_threads,
                "pool_exhaustions": self.pool_exhaustions,
                "total_successes": self.total_successes,
                "total_failures": self.total_failures,
            }

    @property
    def is_healthy(self) -> bool:
        with self._lock:
            return self.state is HealthState.HEALTHY

    @property
    def is_degraded(self) -> bool:
        with self._lock:
            return self.state is HealthState.DEGRADED

    @property
    def is_critical(self) -> bool:
        with self._lock:
            return self.state is HealthState.CRITICAL


__all__ = ["HealthState", "HealthStatus"]
