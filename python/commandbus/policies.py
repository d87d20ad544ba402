"""Retry policies for command processing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from commandbus._validation import INT32_MAX
from commandbus.exceptions import ValidationError

__all__ = ["DEFAULT_RETRY_POLICY", "RetryPolicy"]

# Backoff used when the schedule is empty (same as reliable-cmd).
_FALLBACK_BACKOFF = 30


@dataclass
class RetryPolicy:
    """Policy for retrying transient command failures.

    Attributes:
        max_attempts: Maximum number of attempts (>= 1) before giving up.
        backoff_schedule: Visibility timeouts in seconds before each retry.
            After a failed attempt ``n`` the delay is ``backoff_schedule[n-1]``;
            the last value is reused beyond the end of the schedule. Float
            values are rounded up to whole seconds.

    Example:
        ``RetryPolicy(max_attempts=4, backoff_schedule=[10, 60, 300])`` retries
        10 s after attempt 1, 60 s after attempt 2 and 300 s after attempt 3.
    """

    max_attempts: int = 3
    backoff_schedule: list[int] = field(default_factory=lambda: [10, 60, 300])

    def __post_init__(self) -> None:
        attempts: object = self.max_attempts
        if (
            isinstance(attempts, bool)
            or not isinstance(attempts, int)
            or not 1 <= attempts <= INT32_MAX
        ):
            raise ValidationError(
                "max_attempts", attempts, f"must be an integer from 1 to {INT32_MAX}"
            )
        schedule: object = self.backoff_schedule
        if not isinstance(schedule, list | tuple):
            raise ValidationError("backoff_schedule", schedule, "must be a list of seconds")
        for index, value in enumerate(schedule):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (isinstance(value, float) and not math.isfinite(value))
                or value < 0
            ):
                raise ValidationError(
                    f"backoff_schedule[{index}]",
                    value,
                    "must be a finite number of seconds >= 0",
                )

    def retry_after(self, attempt: int, max_attempts: int | None = None) -> int | None:
        """Decide what a transient failure of ``attempt`` (1-based) means: the seconds to wait
        before the next attempt, or None when the attempts are used up (the command goes to
        the troubleshooting queue as exhausted).

        ``max_attempts`` is the command's own limit (from ``send``); None means this policy's.
        This is the one place the worker decides between retry and exhausted.
        """
        limit = self.max_attempts if max_attempts is None else max_attempts
        if attempt >= limit:
            return None
        schedule = self.backoff_schedule
        if not schedule:
            return _FALLBACK_BACKOFF
        # Capped to what the queue's visibility (an INT of seconds) can hold: a larger backoff
        # would fail at the engine's boundary and lose the outcome.
        return min(math.ceil(schedule[min(max(attempt, 1), len(schedule)) - 1]), INT32_MAX)

    def get_backoff(self, attempt: int) -> int:
        """Return the delay in seconds before retrying after ``attempt``.

        ``attempt`` is 1-based. Returns 0 when no retry should occur
        (``attempt >= max_attempts``).
        """
        delay = self.retry_after(attempt)
        return 0 if delay is None else delay

    def should_retry(self, attempt: int) -> bool:
        """Return True if another attempt is allowed after ``attempt``."""
        return attempt < self.max_attempts


DEFAULT_RETRY_POLICY = RetryPolicy()
"""Default retry policy used by workers."""
