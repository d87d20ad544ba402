"""Timeouts of the sync API, with the predecessor's (`reliable-cmd` 0.2.2) meaning.

The layers, innermost first: PostgreSQL `statement_timeout` (25 s) cancels a statement on the
server; the pool timeout (30 s) fails fast when no connection is free (`PoolTimeout`); the
visibility timeout (30 s) makes an unfinished command visible again; a handler running longer
than the visibility timeout plus 5 s counts as a stuck thread (`HealthStatus`); the
`WorkerWatchdog` acts on a CRITICAL worker. A statement must time out before its command's
lease does: `statement_timeout` (ms) / 1000 < `visibility_timeout` (s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

DEFAULT_STATEMENT_TIMEOUT_MS = 25_000
DEFAULT_VISIBILITY_TIMEOUT_S = 30
DEFAULT_POOL_TIMEOUT_S = 30.0
DEFAULT_WATCHDOG_INTERVAL_S = 10.0
#: added to the visibility timeout: a handler running longer is a stuck thread
STUCK_THREAD_BUFFER_S = 5.0


@dataclass(frozen=True)
class TimeoutConfig:
    """The timeouts of a sync worker in one place; `validate()` checks them."""

    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S
    watchdog_interval_s: float = DEFAULT_WATCHDOG_INTERVAL_S

    @property
    def statement_timeout_s(self) -> float:
        return self.statement_timeout_ms / 1000.0

    @property
    def stuck_threshold_s(self) -> float:
        """Seconds after which a running handler counts as stuck."""
        return self.visibility_timeout_s + STUCK_THREAD_BUFFER_S

    def validate(self) -> None:
        """Raise ValueError unless every timeout is positive and the statement timeout is
        shorter than the visibility timeout."""
        for name in (
            "statement_timeout_ms",
            "visibility_timeout_s",
            "pool_timeout_s",
            "watchdog_interval_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number: {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be positive: {value}")
        if self.statement_timeout_s >= self.visibility_timeout_s:
            raise ValueError(
                f"statement_timeout ({self.statement_timeout_s}s) must be less than "
                f"visibility_timeout ({self.visibility_timeout_s}s)"
            )


def validate_timeouts(
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S,
) -> None:
    """Raise ValueError unless both are positive and statement_timeout_ms / 1000 <
    visibility_timeout_s."""
    TimeoutConfig(
        statement_timeout_ms=statement_timeout_ms, visibility_timeout_s=visibility_timeout_s
    ).validate()


def create_pool_with_timeout(
    conninfo: str,
    min_size: int = 4,
    max_size: int | None = None,
    timeout: float = DEFAULT_POOL_TIMEOUT_S,
    **kwargs: Any,
) -> ConnectionPool[Any]:
    """A psycopg `ConnectionPool` that fails fast when exhausted: `max_size` defaults to twice
    `min_size` (size `min_size` to the worker's concurrency), `timeout` is the seconds a caller
    waits for a connection before `PoolTimeout`. Other keyword arguments go to the pool. As
    `ConnectionPool` itself, it is opened at once unless `open=False` is passed."""
    return ConnectionPool(
        conninfo=conninfo,
        min_size=min_size,
        max_size=min_size * 2 if max_size is None else max_size,
        timeout=timeout,
        **kwargs,
    )


def is_query_cancelled(error: BaseException) -> bool:
    """True for psycopg's `QueryCanceled` (statement_timeout exceeded, or a cancel)."""
    return isinstance(error, pg_errors.QueryCanceled)


def is_pool_timeout(error: BaseException) -> bool:
    """True for psycopg_pool's `PoolTimeout` (no connection free within the pool timeout)."""
    return isinstance(error, PoolTimeout)


def is_timeout_error(error: BaseException) -> bool:
    """True for either timeout: `QueryCanceled` or `PoolTimeout`."""
    return is_query_cancelled(error) or is_pool_timeout(error)


__all__ = [
    "DEFAULT_POOL_TIMEOUT_S",
    "DEFAULT_STATEMENT_TIMEOUT_MS",
    "DEFAULT_VISIBILITY_TIMEOUT_S",
    "DEFAULT_WATCHDOG_INTERVAL_S",
    "STUCK_THREAD_BUFFER_S",
    "TimeoutConfig",
    "create_pool_with_timeout",
    "is_pool_timeout",
    "is_query_cancelled",
    "is_timeout_error",
    "validate_timeouts",
]
