"""`drain_queue`: work every queued command of a domain in-process until its queue is idle.

Built on the public `Worker` API only: rounds of `Worker.run()` in a task, each ended with
`Worker.stop()` (which applies every outcome and gives back leases of commands it claimed but
never started) once the queue looks idle, until a check made with no worker running finds
nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from commandbus import _db, _sql
from commandbus.bus import CommandBus
from commandbus.exceptions import DatabaseError, SchemaNotInstalledError
from commandbus.handler import HandlerRegistry
from commandbus.models import CommandMetadata
from commandbus.policies import RetryPolicy
from commandbus.worker import Worker

#: seconds between two idle checks while handlers run (a check with none running queries the
#: queue; one with handlers running costs nothing)
_CHECK_INTERVAL = 0.01
#: At a timeout the handlers still running are cancelled; their outcomes (WORKER_STOPPED:
#: retried at once) get up to this long to be applied (the stop returns as soon as they are).
STOP_FLUSH_S = 10.0


async def _pending(pool: AsyncConnectionPool[Any], queue: str, wait_for_retries: bool) -> int:
    """Messages the drain still has to wait for: those visible now (with `wait_for_retries`:
    every message in the queue)."""
    try:
        row = await _db.fetch_one(pool, "queue_message_counts", queue)
    except DatabaseError as exc:
        missing_queue = isinstance(exc.__cause__, psycopg.errors.UndefinedTable)
        if missing_queue and not isinstance(exc, SchemaNotInstalledError):
            return 0  # the queue does not exist yet: nothing was ever sent to the domain
        raise
    assert row is not None
    total, visible = row
    if wait_for_retries:
        return int(total)
    if visible is None:
        raise RuntimeError(
            "drain_queue needs PGMQ >= 1.5 (pgmq.metrics() without queue_visible_length); "
            "pass wait_for_retries=True to wait until the queue is empty instead"
        )
    return int(visible)


async def drain_queue(
    pool: AsyncConnectionPool[Any],
    domain: str,
    registry: HandlerRegistry,
    *,
    concurrency: int = 1,
    timeout: float = 30.0,
    wait_for_retries: bool = False,
    retry_policy: RetryPolicy | None = None,
    visibility_timeout: int = 30,
    poll_interval: float = 0.05,
) -> list[CommandMetadata]:
    """Work the commands queued for `domain` with the handlers of `registry`, in this process,
    until the queue is idle; return what became of each command worked.

    Idle means: no message of the domain's queue (`{domain}__commands`) is visible, no handler
    is running, and every outcome is applied. Commands the handlers send to the same domain
    during the drain are worked too. A command retried with a backoff becomes visible only
    when its backoff ends: the drain does not wait for it (it is returned `PENDING`, with its
    attempt and last error), unless `wait_for_retries=True`, which waits until the queue is
    empty: every command finished, retried (give the worker a `retry_policy` with short
    backoffs) until it completes or its attempts are used up.

    Handlers run as they do under `Worker.run(concurrency)`: errors become retries, the
    troubleshooting queue or `FAILED` exactly as in production (with `concurrency=1`, the
    default, one at a time in queue order).

    Args:
        pool: an open pool on the database (the worker's engine connects with its conninfo).
        domain: the domain whose queue is drained.
        registry: the handlers.
        concurrency: handlers run at once.
        timeout: seconds before giving up with `TimeoutError` (running handlers are cancelled
            and the worker stopped first).
        wait_for_retries: also wait for commands whose retry backoff has not ended.
        retry_policy: the worker's retry policy (backoffs; max_attempts for commands sent
            without one).
        visibility_timeout: the worker's lease, seconds.
        poll_interval: how often the worker looks for messages that became visible without a
            NOTIFY (retries whose backoff ended).

    Returns:
        The `CommandMetadata` of every command claimed during the drain (status, attempts,
        last error, result...), read after the drain, in the order the commands were sent
        (created_at, then queue message id). A command retried within the drain appears once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    queue = _sql.command_queue(domain)
    try:
        mark = int(await _db.fetch_value(pool, "audit_last_id"))
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaNotInstalledError(f"commandbus schema missing ({exc})", exc.sqlstate) from exc
    # Each round runs a worker until the queue looks idle, then stops it: stop() applies every
    # outcome and releases what the worker claimed but never started. Only a check made with
    # no worker running can tell "idle" for sure (a retry without backoff, a released lease).
    while await _pending(pool, queue, wait_for_retries):
        worker = Worker(
            pool, domain, registry, visibility_timeout=visibility_timeout, retry_policy=retry_policy
        )
        run = asyncio.create_task(
            worker.run(concurrency=concurrency, poll_interval=poll_interval),
            name=f"rcmd-drain-{domain}",
        )
        await asyncio.sleep(0)  # run() starts: stop() from here on stops it
        try:
            timed_out = await _until_idle(worker, run, pool, queue, wait_for_retries, deadline)
        except BaseException:  # the drain itself was cancelled: cut the handlers off
            await worker.stop(timeout=STOP_FLUSH_S, cancel_handlers=True)
            with contextlib.suppress(BaseException):
                await run
            raise
        # A claim answered after the idle check may still start handlers: stop() waits for
        # them, up to the deadline, where those still running are cancelled (their attempt
        # counts: retried at once). The engine's part of the stop (claims in flight, outcomes,
        # releases) gets STOP_FLUSH_S after that: a budget cut to what is left of the deadline
        # (nothing, at worst) aborted a claim in flight whose transaction still committed, and
        # left its command IN_PROGRESS until its lease expired.
        if timed_out:
            await worker.stop(timeout=STOP_FLUSH_S, cancel_handlers=True)
        else:
            cutoff = loop.call_at(deadline, _cancel_handlers, worker)
            try:
                await worker.stop(timeout=max(0.0, deadline - loop.time()) + STOP_FLUSH_S)
            finally:
                cutoff.cancel()
        await run  # raises what run() raised (SchemaNotInstalledError...)
        if timed_out or loop.time() >= deadline:
            left = await _pending(pool, queue, wait_for_retries)
            raise TimeoutError(
                f"drain_queue({domain!r}): queue {queue} not idle after {timeout} s "
                f"({left} messages {'left' if wait_for_retries else 'visible'})"
            )
    ids: list[UUID] = [
        row[0] for row in await _db.fetch_all(pool, "commands_claimed_since", domain, mark)
    ]
    bus = CommandBus(pool)
    outcomes: list[CommandMetadata] = []
    for command_id in ids:
        meta = await bus.get_command(domain, command_id)
        if meta is not None:  # None only when something else deleted it meanwhile
            outcomes.append(meta)
    return outcomes


def _cancel_handlers(worker: Worker) -> None:
    """The drain's deadline came during a graceful stop: cut off the handlers still running."""
    for task in list(worker._in_flight):
        task.cancel()


async def _until_idle(
    worker: Worker,
    run: asyncio.Task[None],
    pool: AsyncConnectionPool[Any],
    queue: str,
    wait_for_retries: bool,
    deadline: float,
) -> bool:
    """Wait until no handler runs and no message is pending (or `run` ended); True when the
    deadline passed first."""
    loop = asyncio.get_running_loop()
    while not run.done():
        if loop.time() > deadline:
            return True
        if worker.in_flight_count == 0 and not await _pending(pool, queue, wait_for_retries):
            return False
        await asyncio.sleep(_CHECK_INTERVAL)
    return False


__all__ = ["drain_queue"]
