"""Type stub of the Rust extension `commandbus._native` (rust/py)."""

from typing import Literal, TypeAlias, final
from uuid import UUID

__all__ = [
    "Completions",
    "NativeBus",
    "NativeWorker",
    "Outcome",
    "__version__",
    "migrations",
    "statements",
]

__version__: str

# (msg_id, attempt, max_attempts, command_id, command_type, data_json, correlation_id,
#  reply_to, batch_id, created_at_us)
_ClaimedTuple: TypeAlias = tuple[
    int, int, int, UUID, str, str, UUID | None, str | None, UUID | None, int
]

def migrations() -> list[tuple[int, str, str]]: ...
def statements() -> list[tuple[str, str]]: ...

@final
class Completions:
    """Results of native calls for one event loop (see commandbus/_bridge.py)."""

    def __new__(cls) -> Completions: ...
    def take_reader_fd(self) -> int: ...
    def take(self) -> list[tuple[int, bool, object]]: ...

#: (domain, command_ids, command_types, messages, correlation_ids, reply_tos, max_attempts,
#: batch_ids): one domain's commands to send.
_UnitColumns: TypeAlias = tuple[
    str,
    list[UUID],
    list[str],
    list[str],
    list[UUID],
    list[str | None],
    list[int | None],
    list[UUID | None],
]

@final
class NativeBus:
    def __new__(
        cls,
        dsn: str,
        max_connections: int = 10,
        call_timeout: float = 10.0,
        application_name: str | None = None,
    ) -> NativeBus: ...
    def send(self, completions: Completions, columns: _UnitColumns) -> int: ...
    def send_ordered(
        self,
        completions: Completions,
        units: list[_UnitColumns],
        depth: int,
    ) -> int: ...
    def ensure_queue(self, completions: Completions, queue: str) -> int: ...
    def close(self, completions: Completions) -> int: ...

@final
class Outcome:
    """A handler's outcome (immutable). The worker's RetryPolicy has already decided between
    `retry` and `exhausted`; the flush applies what it is given."""

    @staticmethod
    def success(result: str | None = None) -> Outcome: ...
    @staticmethod
    def retry(code: str, message: str, details: str | None, backoff: int) -> Outcome: ...
    @staticmethod
    def exhausted(code: str, message: str, details: str | None) -> Outcome: ...
    @staticmethod
    def permanent(
        code: str, message: str, details: str | None, error_type: str = "PERMANENT"
    ) -> Outcome: ...
    @staticmethod
    def business_rule(code: str, message: str, details: str | None) -> Outcome: ...
    @property
    def kind(self) -> Literal["SUCCESS", "RETRY", "EXHAUSTED", "PERMANENT", "BUSINESS_RULE"]: ...
    @property
    def backoff(self) -> int | None: ...

@final
class NativeWorker:
    def __new__(
        cls,
        dsn: str,
        domain: str,
        visibility_timeout: int = 30,
        default_max_attempts: int = 3,
        use_notify: bool = True,
        poll_interval: float = 1.0,
        max_flush: int = 1000,
        auto_extend: bool = False,
        max_connections: int = 4,
        concurrency: int = 1,
        call_timeout: float = 10.0,
        application_name: str | None = None,
    ) -> NativeWorker: ...
    def start(self, completions: Completions) -> int: ...
    def next_batch(self, completions: Completions) -> int: ...
    def next_event(self, completions: Completions) -> int: ...
    def receive(self, completions: Completions, max: int, visibility_timeout: int) -> int: ...
    def report(self, msg_id: int, attempt: int, outcome: Outcome) -> bool: ...
    def finish_now(
        self, completions: Completions, msg_id: int, attempt: int, outcome: Outcome
    ) -> int: ...
    def extend(self, completions: Completions, msg_id: int, attempt: int, seconds: int) -> int: ...
    def flush(self, completions: Completions) -> int: ...
    def stop_claiming(self) -> None: ...
    def shutdown(self, completions: Completions, timeout: float | None = None) -> int: ...
    def stats(self) -> dict[str, int | str | None]: ...
    def enable_outcome_metrics(
        self, duration_bounds: list[float], wait_bounds: list[float]
    ) -> None: ...
    def take_outcome_metrics(
        self,
    ) -> list[tuple[str, list[int], list[int], float, list[int], float]]: ...
