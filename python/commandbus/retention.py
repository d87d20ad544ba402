"""Retention: drop old finished commands and the audit trail by whole day partitions; prune
what is left of them, archived payloads and queue messages, and the completed batches left
empty, in bounded chunks.

`prune()` removes COMPLETED, FAILED and CANCELED commands whose `updated_at` is older than the
cutoff, by whole UTC days: those created before the start of the cutoff's day (the rest of that
day goes with it later). PENDING, IN_PROGRESS and IN_TROUBLESHOOTING_QUEUE commands are never
touched, nor the finished commands of a batch or a process that has not ended. In that order:

1. the command table's day partitions that end before the cutoff and hold only such commands
   (of the domain pruned, when one is given) are detached and dropped whole
   (`commandbus.drop_day_partition_v1`): no row DELETE, nothing left for vacuum;
2. the commands left past the cutoff (in a partition something else keeps) are deleted one
   transaction per chunk (`commandbus.prune_v2`), with their queue messages and archived
   payloads; so are archived messages past the cutoff and the batches complete since before it
   with none of their commands (or processes) left;
3. the audit trail's day partitions that end before the cutoff are dropped, each once no
   command or batch that still exists has a row in it;
4. the command_id reservations turn over when due (`commandbus.rotate_command_keys_v1`): a
   command_id stays reserved while its command exists and for at least `older_than` after it
   was sent.

Concurrent pruners are safe: rows locked by another one are skipped, and one pruner at a time
drops a table's partitions.

`ensure_partitions()` creates the day partitions of the audit trail and of the command table
ahead of time (setup_database() and workers call it).

`run_retention()` repeats it on a schedule (`RetentionPolicy`), e.g. inside a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus._validation import validate_domain
from commandbus.exceptions import ValidationError

logger = logging.getLogger(__name__)

DEFAULT_PRUNE_CHUNK_SIZE = 1_000


@dataclass(frozen=True)
class PruneResult:
    """What a prune deleted (totals over all chunks).

    Attributes:
        commands: command rows.
        audit_events: audit rows (of the commands and of the pruned batches).
        payloads: payload_archive rows.
        messages: PGMQ messages (archived, and stale ones of the live queue).
        batches: batch rows.
        partitions: audit day partitions dropped (their rows are not in audit_events).
        partition_rows: the dropped audit partitions' estimated row count (from the statistics).
        partitions_kept: audit partitions past the cutoff kept because an existing command or
            batch has rows in them.
        command_partitions: command day partitions dropped whole (their rows are not in
            `commands`).
        command_partition_rows: their estimated row count (from the statistics).
        command_partitions_kept: command partitions past the cutoff kept because a command in
            them is still kept (their prunable rows are deleted one by one).
        keys_rotated: whether the command_id reservations turned over.
        chunks: calls of `commandbus.prune_v2` (one transaction each).
        cutoff: the cutoff used (rows last updated before it were eligible).
    """

    commands: int = 0
    audit_events: int = 0
    payloads: int = 0
    messages: int = 0
    batches: int = 0
    partitions: int = 0
    partition_rows: int = 0
    partitions_kept: int = 0
    command_partitions: int = 0
    command_partition_rows: int = 0
    command_partitions_kept: int = 0
    keys_rotated: bool = False
    chunks: int = 0
    cutoff: datetime | None = field(default=None, compare=False)


ProgressCallback = Callable[[PruneResult], None]


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValidationError("chunk_size", chunk_size, "must be an integer >= 1")
    return chunk_size


def _check_duty(max_duty: object) -> float:
    if isinstance(max_duty, bool) or not isinstance(max_duty, int | float) or not 0 < max_duty <= 1:
        raise ValidationError("max_duty", max_duty, "must be a number in (0, 1]")
    return float(max_duty)


def _check_age(older_than: object) -> timedelta:
    if not isinstance(older_than, timedelta) or older_than < timedelta(0):
        raise ValidationError("older_than", older_than, "must be a timedelta >= 0")
    return older_than


async def _cutoff(pool: AsyncConnectionPool[Any], older_than: datetime | timedelta) -> datetime:
    if isinstance(older_than, datetime):
        if older_than.tzinfo is None or older_than.utcoffset() is None:
            raise ValidationError("older_than", older_than, "must be a timezone-aware datetime")
        return older_than
    # The database clock decides "now", as for updated_at.
    cutoff = await _db.fetch_value(pool, "retention_cutoff", _check_age(older_than))
    assert isinstance(cutoff, datetime)
    return cutoff


async def prune(
    pool: AsyncConnectionPool[Any],
    older_than: datetime | timedelta,
    domain: str | None = None,
    *,
    chunk_size: int = DEFAULT_PRUNE_CHUNK_SIZE,
    on_progress: ProgressCallback | None = None,
    max_duty: float = 1.0,
) -> PruneResult:
    """Remove terminal commands last updated before the cutoff, with their audit rows,
    payload_archive rows and queue messages, and the complete batches left empty: whole day
    partitions where they can go whole, row by row where they cannot (see the module).

    Args:
        pool: the psycopg async pool.
        older_than: the cutoff (a timezone-aware datetime), or an age (a timedelta: the cutoff
            is the database's now() minus it).
        domain: prune one domain only (None: all domains).
        chunk_size: most commands (and batches) deleted per transaction.
        on_progress: called with the running totals after each chunk.
        max_duty: the share of its run time the prune spends in the database (0 < x <= 1):
            after a chunk that took t seconds it pauses t * (1 / max_duty - 1) seconds, so a
            prune of a large backlog does not compete with the workers at full speed
            (1.0: no pause).

    Raises:
        ValidationError: bad cutoff, domain or chunk size (nothing deleted).
        DatabaseError: the database failed; chunks already committed stay deleted.
    """
    return await _prune(pool, older_than, domain, chunk_size, on_progress, None, max_duty)


async def _prune(
    pool: AsyncConnectionPool[Any],
    older_than: datetime | timedelta,
    domain: str | None,
    chunk_size: int,
    on_progress: ProgressCallback | None,
    stop_event: asyncio.Event | None,
    max_duty: float = 1.0,
) -> PruneResult:
    """`prune`, stopping between chunks once `stop_event` is set."""
    _check_chunk_size(chunk_size)
    _check_duty(max_duty)
    if domain is not None:
        validate_domain(domain)
    cutoff = await _cutoff(pool, older_than)
    total = PruneResult(cutoff=cutoff)
    async for rows, kept in _drop_day_partitions(pool, "command", cutoff, domain, stop_event):
        total = replace(total, command_partitions_kept=kept)
        if rows is not None:
            total = replace(
                total,
                command_partitions=total.command_partitions + 1,
                command_partition_rows=total.command_partition_rows + rows,
            )
            if on_progress is not None:
                on_progress(total)
    after: datetime | None = None  # where the previous chunk stopped (prune_v2 goes on there)
    while True:
        # One chunk per call, each in its own transaction (committed on return).
        started = time.monotonic()
        row = await _db.fetch_one(
            pool, "retention_prune", cutoff, domain, chunk_size, after, rows=dict
        )
        elapsed = time.monotonic() - started
        assert row is not None  # prune_v2 always returns its one row of counts
        after = row["last_created_at"]
        total = replace(
            total,
            commands=total.commands + row["commands"],
            audit_events=total.audit_events + row["audit_events"],
            payloads=total.payloads + row["payloads"],
            messages=total.messages + row["messages"],
            batches=total.batches + row["batches"],
            chunks=total.chunks + 1,
        )
        if on_progress is not None:
            on_progress(total)
        if row["commands"] == 0 and row["batches"] == 0 and row["messages"] == 0:
            break
        if stop_event is not None and stop_event.is_set():
            break
        if max_duty < 1.0:
            pause = elapsed * (1.0 / max_duty - 1.0)
            if stop_event is None:
                await asyncio.sleep(pause)
            elif await _stopped_within(stop_event, pause):
                break
    async for rows, kept in _drop_day_partitions(pool, "audit", cutoff, None, stop_event):
        total = replace(total, partitions_kept=kept)
        if rows is not None:
            total = replace(
                total, partitions=total.partitions + 1, partition_rows=total.partition_rows + rows
            )
            if on_progress is not None:
                on_progress(total)
    if stop_event is None or not stop_event.is_set():
        rotated = await _db.fetch_value(pool, "retention_rotate_keys", cutoff)
        total = replace(total, keys_rotated=bool(rotated))
        if rotated and on_progress is not None:
            on_progress(total)
    logger.info(
        "pruned %d command partitions (%d kept), %d commands, %d audit rows, %d payloads, "
        "%d messages, %d batches, %d audit partitions (%d kept), keys rotated: %s "
        "(domain %s, before %s, %d chunks)",
        total.command_partitions, total.command_partitions_kept, total.commands,
        total.audit_events, total.payloads, total.messages, total.batches, total.partitions,
        total.partitions_kept, total.keys_rotated, domain or "*", cutoff.isoformat(), total.chunks,
    )  # fmt: skip
    return total


async def _drop_day_partitions(
    pool: AsyncConnectionPool[Any],
    table: str,
    cutoff: datetime,
    domain: str | None,
    stop_event: asyncio.Event | None,
) -> AsyncIterator[tuple[int | None, int]]:
    """Drop the day partitions of commandbus.`table` that retention may drop whole at `cutoff`
    (`commandbus.drop_day_partition_v1`), one per call, each in its own transaction (a short
    lock of the table). Yields (estimated rows of the partition dropped, partitions kept) after
    each drop, and (None, partitions kept) once none is left."""
    while stop_event is None or not stop_event.is_set():
        part = await _db.fetch_one(
            pool, "retention_drop_partition", f"commandbus.{table}", cutoff, domain, rows=dict
        )
        assert part is not None
        if part["dropped"] is None:
            yield None, part["kept"]
            return
        logger.info("dropped %s partition %s (~%d rows)", table, part["dropped"], part["est_rows"])
        yield max(0, part["est_rows"]), part["kept"]


DEFAULT_PARTITION_DAYS_AHEAD = 7


async def ensure_partitions(
    pool: AsyncConnectionPool[Any], days_ahead: int = DEFAULT_PARTITION_DAYS_AHEAD
) -> int:
    """Create the day partitions (UTC days) of the audit trail and of the command table from
    yesterday to `days_ahead` days ahead that do not exist yet; return how many were created.

    Idempotent and safe from several processes at once. setup_database() and every worker
    call it; a row no partition covers lands in the default partition meanwhile (and moves
    into its day's partition when that is created).

    Raises:
        ValidationError: `days_ahead` is not an integer in 0..3650.
    """
    if (
        isinstance(days_ahead, bool)
        or not isinstance(days_ahead, int)
        or not 0 <= days_ahead <= 3650
    ):
        raise ValidationError("days_ahead", days_ahead, "must be an integer in 0..3650")
    created = await _db.fetch_value(pool, "partitions_ensure", days_ahead)
    if created:
        logger.info("created %d day partitions", created)
    return int(created or 0)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long terminal commands are kept, and how often `run_retention` prunes.

    Attributes:
        older_than: keep terminal commands this long after their last update (they go by
            whole UTC days: up to a day longer).
        interval: seconds between prunes.
        chunk_size: most commands deleted per transaction.
        domain: prune this domain only (None: all domains).
        max_duty: the share of its run time a prune spends in the database (see `prune`);
            0.25 by default: a prune runs at most a quarter of the time, next to the workers
            (a day of 2,000,000 finished commands goes as a day partition in about 4 s on 2
            cores, the workers at 0.96 of their rate; what goes row by row is paced:
            benches/README.md, "History").
    """

    older_than: timedelta
    interval: float = 3600.0
    chunk_size: int = DEFAULT_PRUNE_CHUNK_SIZE
    domain: str | None = None
    max_duty: float = 0.25

    def __post_init__(self) -> None:
        _check_age(self.older_than)
        if (
            isinstance(self.interval, bool)
            or not isinstance(self.interval, int | float)
            or self.interval <= 0
        ):
            raise ValidationError("interval", self.interval, "must be a number > 0 (seconds)")
        _check_chunk_size(self.chunk_size)
        if self.domain is not None:
            validate_domain(self.domain)
        _check_duty(self.max_duty)

    def for_domain(self, domain: str) -> RetentionPolicy:
        """This policy restricted to `domain` unless it names one already."""
        return self if self.domain is not None else replace(self, domain=domain)


async def run_retention(
    pool: AsyncConnectionPool[Any],
    policy: RetentionPolicy,
    stop_event: asyncio.Event,
    *,
    initial_delay: float | None = None,
) -> None:
    """Prune per `policy` every `policy.interval` seconds until `stop_event` is set.

    The first prune runs after `initial_delay` seconds (default: a random delay of up to
    min(interval, 30) s, so workers started together do not prune at the same moment). A
    failed prune is logged and retried at the next interval. Returns soon after `stop_event`
    is set (between two chunks of a prune).
    """
    delay = (
        random.uniform(0, min(policy.interval, 30.0)) if initial_delay is None else initial_delay
    )
    while not await _stopped_within(stop_event, delay):
        try:
            await ensure_partitions(pool)
            await _prune(
                pool, policy.older_than, policy.domain, policy.chunk_size, None, stop_event,
                policy.max_duty,
            )  # fmt: skip
        except Exception:
            logger.exception("retention prune failed (domain %s)", policy.domain or "*")
        delay = policy.interval


async def run_partition_upkeep(
    pool: AsyncConnectionPool[Any],
    stop_event: asyncio.Event,
    *,
    interval: float = 3600.0,
    days_ahead: int = DEFAULT_PARTITION_DAYS_AHEAD,
) -> None:
    """`ensure_partitions` now and every `interval` seconds until `stop_event` is set (a failure
    is logged and retried at the next interval). Workers run it."""
    delay = 0.0
    while not await _stopped_within(stop_event, delay):
        try:
            await ensure_partitions(pool, days_ahead)
        except Exception:
            logger.exception("creating day partitions failed")
        delay = interval


async def _stopped_within(stop_event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True as soon as `stop_event` is set."""
    if stop_event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop_event.wait(), timeout=max(0.0, seconds))
    return stop_event.is_set()


__all__ = [
    "DEFAULT_PARTITION_DAYS_AHEAD",
    "DEFAULT_PRUNE_CHUNK_SIZE",
    "ProgressCallback",
    "PruneResult",
    "RetentionPolicy",
    "ensure_partitions",
    "prune",
    "run_partition_upkeep",
    "run_retention",
]
