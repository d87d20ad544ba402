"""The seed's end-to-end model: a probabilistic handler, the Expected Outcomes Calculator, and
bulk generation of up to 1,000,000 commands.

Each command of type ``TestCommand`` in domain ``e2e`` carries a ``behavior`` in its data::

    {"fail_permanent_pct": 2, "fail_transient_pct": 8, "timeout_pct": 0,
     "min_duration_ms": 0, "max_duration_ms": 0}

and each attempt rolls, in this order (independent draws, first match wins): permanent failure
(:class:`PermanentCommandError`, straight to the TSQ), transient failure
(:class:`TransientCommandError`, retried until its attempts are used up), timeout (the handler
sleeps :attr:`Behavior.timeout_seconds`, 1.5 times the default lease of 30 s, then succeeds: the
worker's lease keeper holds the lease meanwhile), else success after a duration drawn from a
normal distribution between min and max (mean in the middle, 99.7% within the range, clamped).

Pure library (no web framework): ``rcmd worker commandbus.e2e:registry --domain e2e`` runs it.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

from commandbus.bus import CommandBus
from commandbus.exceptions import (
    PermanentCommandError,
    TransientCommandError,
    ValidationError,
)
from commandbus.handler import HandlerRegistry
from commandbus.models import BatchCommand, Command, HandlerContext, SendRequest

DOMAIN = "e2e"
COMMAND_TYPE = "TestCommand"
#: The most commands one bulk generation sends.
MAX_BULK = 1_000_000
#: The most commands a bulk generation puts in one batch (create_batch is one atomic call).
MAX_BATCH = 100_000
#: Commands built and sent per step of a bulk generation (memory stays bounded; progress moves).
GENERATION_STEP = 50_000

Outcome = str  # "permanent" | "transient" | "timeout" | "success"
_PCT_FIELDS = ("fail_permanent_pct", "fail_transient_pct", "timeout_pct")


@dataclass(frozen=True)
class Behavior:
    """The probabilities (percent, 0-100) and success duration range of a test command."""

    fail_permanent_pct: float = 0.0
    fail_transient_pct: float = 0.0
    timeout_pct: float = 0.0
    min_duration_ms: int = 0
    max_duration_ms: int = 0
    error_code: str | None = None
    error_message: str | None = None
    timeout_seconds: float = 45.0

    def __post_init__(self) -> None:
        for name in _PCT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(name, value, "must be a number from 0 to 100")
            if not (0.0 <= float(value) <= 100.0) or math.isnan(value):
                raise ValidationError(name, value, "must be from 0 to 100")
        for name in ("min_duration_ms", "max_duration_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValidationError(name, value, "must be an integer >= 0")
        if self.max_duration_ms < self.min_duration_ms:
            raise ValidationError(
                "max_duration_ms", self.max_duration_ms, "must be >= min_duration_ms"
            )
        t = self.timeout_seconds
        if isinstance(t, bool) or not isinstance(t, int | float) or not (0 <= t <= 3600):
            raise ValidationError("timeout_seconds", t, "must be a number of seconds, 0 to 3600")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Behavior:
        """A behavior from a command's ``behavior`` dict (missing fields: defaults; unknown
        fields: a ValidationError naming them)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValidationError("behavior", data, "must be an object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValidationError("behavior", unknown[0], "is not a behavior field")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what a command carries)."""
        default = Behavior()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}


def sample_duration_ms(min_ms: int, max_ms: int, rng: random.Random | None = None) -> float:
    """A duration from the normal distribution of mean (min+max)/2 and standard deviation
    (max-min)/6, clamped to [min, max]; exactly min when min == max."""
    if min_ms == max_ms:
        return float(min_ms)
    draw = (rng or random).gauss((min_ms + max_ms) / 2, (max_ms - min_ms) / 6)
    return max(float(min_ms), min(float(max_ms), draw))


def roll(behavior: Behavior, rng: random.Random | None = None) -> Outcome:
    """One attempt's outcome: independent draws in the seed's order, first match wins."""
    r = rng or random
    if r.random() * 100 < behavior.fail_permanent_pct:
        return "permanent"
    if r.random() * 100 < behavior.fail_transient_pct:
        return "transient"
    if r.random() * 100 < behavior.timeout_pct:
        return "timeout"
    return "success"


async def handle_test_command(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
    """The probabilistic handler of ``e2e.TestCommand``."""
    behavior = Behavior.from_dict(cmd.data.get("behavior"))
    outcome = roll(behavior)
    if outcome == "permanent":
        raise PermanentCommandError(
            behavior.error_code or "PERMANENT_ERROR",
            behavior.error_message or "Probabilistic permanent failure",
        )
    if outcome == "transient":
        raise TransientCommandError(
            behavior.error_code or "TRANSIENT_ERROR",
            behavior.error_message or "Probabilistic transient failure",
        )
    started = time.monotonic()
    if outcome == "timeout":
        await asyncio.sleep(behavior.timeout_seconds)
    duration = sample_duration_ms(behavior.min_duration_ms, behavior.max_duration_ms)
    if duration > 0:
        await asyncio.sleep(duration / 1000)
    return {
        "status": "success",
        "attempt": ctx.attempt,
        "timed_out": outcome == "timeout",
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }


#: The handlers of domain ``e2e``: ``rcmd worker commandbus.e2e:registry --domain e2e``.
registry = HandlerRegistry()
registry.register(DOMAIN, COMMAND_TYPE, handle_test_command)


# -- the Expected Outcomes Calculator ------------------------------------------------------


@dataclass(frozen=True)
class ExpectedOutcomes:
    """Expected counts for `count` commands.

    First attempt, as the seed's calculator shows it: `permanent` (to the TSQ at once),
    `transient` (retried), `timeout` (slow, then succeed), `success` (first attempt, not timed
    out). After every retry (`max_attempts` attempts at most): `final_completed` and
    `final_tsq` (permanent on some attempt, or transient on every one).
    """

    count: int
    max_attempts: int
    permanent: float
    transient: float
    timeout: float
    success: float
    final_completed: float
    final_tsq: float

    def lines(self) -> list[str]:
        """The seed's example as text."""
        return [
            f"~{self.permanent:,.0f} permanent failures → TSQ immediately",
            f"~{self.transient:,.0f} transient failures → Retry (some recover)",
            f"~{self.timeout:,.0f} timeouts → slow, then succeed",
            f"~{self.success:,.0f} succeed on first attempt",
        ]


def expected_outcomes(behavior: Behavior, count: int, max_attempts: int = 3) -> ExpectedOutcomes:
    """The Expected Outcomes Calculator: for 10,000 commands with 2% permanent and 8%
    transient, ~200 permanent, ~784 transient, ~9,016 succeed on the first attempt."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValidationError("count", count, "must be an integer >= 0")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValidationError("max_attempts", max_attempts, "must be an integer >= 1")
    p = behavior.fail_permanent_pct / 100
    t = (1 - p) * behavior.fail_transient_pct / 100  # per attempt
    rest = (1 - p) * (1 - behavior.fail_transient_pct / 100)
    timeout = rest * behavior.timeout_pct / 100
    # An attempt ends the command unless it is transient; the last attempt's transient failure
    # exhausts it (TSQ).
    reach = [t**k for k in range(max_attempts)]  # probability of reaching attempt k + 1
    completed = sum(r * rest for r in reach)
    tsq = sum(r * p for r in reach) + t**max_attempts
    return ExpectedOutcomes(
        count=count,
        max_attempts=max_attempts,
        permanent=count * p,
        transient=count * t,
        timeout=count * timeout,
        success=count * (rest - timeout),
        final_completed=count * completed,
        final_tsq=count * tsq,
    )


# -- bulk generation -----------------------------------------------------------------------


def time_ordered_uuid() -> UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits. Generated commands
    take these ids: a million random UUIDs would each land on a random page of the indexes on
    command_id (the command table's unique index, the audit trail's), a time-ordered id lands
    on the rightmost pages, which stay in memory."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | (0x7 << 76) | ((rand >> 68) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & ((1 << 62) - 1))
    return UUID(int=value)


#: Called with (sent so far, total) as the generation moves.
GenerationProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationResult:
    """What a bulk generation sent: how many, in how long, and the batch (when asked)."""

    count: int
    seconds: float
    batch_id: UUID | None


def _requests(
    domain: str, n: int, data: dict[str, Any], max_attempts: int | None
) -> list[SendRequest]:
    return [
        SendRequest(domain, COMMAND_TYPE, time_ordered_uuid(), data, max_attempts=max_attempts)
        for _ in range(n)
    ]


async def generate(
    bus: CommandBus,
    count: int,
    behavior: Behavior,
    *,
    domain: str = DOMAIN,
    batch_name: str | None = None,
    max_attempts: int | None = None,
    on_progress: GenerationProgress | None = None,
) -> GenerationResult:
    """Send `count` (1 to :data:`MAX_BULK`) ``TestCommand``s sharing `behavior`, in steps of
    :data:`GENERATION_STEP` through ``send_batch``; with `batch_name`, as one batch (at most
    :data:`MAX_BATCH` commands, one atomic ``create_batch``)."""
    if isinstance(count, bool) or not isinstance(count, int) or not (1 <= count <= MAX_BULK):
        raise ValidationError("count", count, f"must be an integer from 1 to {MAX_BULK:,}")
    if batch_name is not None and count > MAX_BATCH:
        raise ValidationError("count", count, f"a batch holds at most {MAX_BATCH:,} commands")
    data = {"behavior": behavior.to_dict()}
    started = time.perf_counter()
    if batch_name is not None:
        result = await bus.create_batch(
            domain,
            [
                BatchCommand(COMMAND_TYPE, time_ordered_uuid(), data, max_attempts=max_attempts)
                for _ in range(count)
            ],
            name=batch_name,
            custom_data={"behavior": behavior.to_dict(), "source": "bulk generation"},
        )
        if on_progress is not None:
            on_progress(count, count)
        return GenerationResult(count, time.perf_counter() - started, result.batch_id)

    def build(n: int) -> asyncio.Future[list[SendRequest]]:
        # Built in a thread: the event loop (a console serving pages) stays responsive, and
        # the next step is built while this one's chunks are in the database (the engine
        # releases the GIL while it waits).
        return asyncio.ensure_future(asyncio.to_thread(_requests, domain, n, data, max_attempts))

    sent = 0
    upcoming = build(min(GENERATION_STEP, count))
    try:
        while sent < count:
            requests = await upcoming
            after = sent + len(requests)
            if after < count:
                upcoming = build(min(GENERATION_STEP, count - after))
            base = sent

            def progress(done: int, _total: int, base: int = base) -> None:
                if on_progress is not None:
                    on_progress(base + done, count)

            await bus.send_batch(requests, on_progress=progress)
            sent = after
            if on_progress is not None:
                on_progress(sent, count)
    finally:
        if not upcoming.done():  # a send failed or the job was cancelled
            upcoming.cancel()
    return GenerationResult(count, time.perf_counter() - started, None)


# -- the demo worker ------------------------------------------------------------------------


async def _work(dsn: str, concurrency: int) -> None:
    import socket

    from psycopg.conninfo import make_conninfo
    from psycopg_pool import AsyncConnectionPool

    from commandbus.worker import Worker

    # Named as the engine names a worker's connections: the console lists it.
    name = f"rcmd worker {DOMAIN} {socket.gethostname()}:{os.getpid()}"
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        make_conninfo(dsn, application_name=name), min_size=1, max_size=4, open=False
    )
    await pool.open(wait=True)
    worker = Worker(pool, DOMAIN, registry)
    try:
        # SIGINT / SIGTERM: a graceful stop (running handlers finish, outcomes are applied).
        await worker.run(concurrency=concurrency, handle_signals=True)
    finally:
        await pool.close()


def _process(dsn: str, concurrency: int) -> None:
    import contextlib

    with contextlib.suppress(KeyboardInterrupt):  # a SIGINT before the worker handles signals
        asyncio.run(_work(dsn, concurrency))


def main(argv: list[str] | None = None) -> int:
    """`python -m commandbus.e2e --dsn URL [--processes N] [--concurrency C]`: workers of the
    E2E domain running the probabilistic handler until interrupted (Ctrl-C stops them)."""
    import argparse
    import multiprocessing
    import sys

    p = argparse.ArgumentParser(prog="python -m commandbus.e2e", description=main.__doc__)
    p.add_argument("--dsn", default=os.environ.get("DATABASE_URL"), help="default: DATABASE_URL")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=64, help="handlers at once per process")
    args = p.parse_args(argv)
    if not args.dsn:
        print("error: give --dsn or set DATABASE_URL", file=sys.stderr)
        return 2
    if args.processes < 1 or args.concurrency < 1:
        print("error: --processes and --concurrency must be >= 1", file=sys.stderr)
        return 2
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_process, args=(args.dsn, args.concurrency), name=f"e2e-worker-{i}")
        for i in range(args.processes)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        # The children got the same SIGINT (one process group): each stops gracefully.
        for proc in procs:
            proc.join(timeout=35)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    return max((proc.exitcode or 0) for proc in procs)


if __name__ == "__main__":
    import sys

    sys.exit(main())


__all__ = [
    "COMMAND_TYPE",
    "DOMAIN",
    "MAX_BATCH",
    "MAX_BULK",
    "Behavior",
    "ExpectedOutcomes",
    "GenerationResult",
    "expected_outcomes",
    "generate",
    "handle_test_command",
    "main",
    "registry",
    "roll",
    "sample_duration_ms",
    "time_ordered_uuid",
]
