"""OpenTelemetry tracing of commands (the `otel` extra: opentelemetry-api).

    from commandbus import tracing

    tracing.instrument_sending()   # senders: messages carry the current trace context
    tracing.instrument(worker)     # workers: one span per handler run, child of the sender's

`instrument_sending()` makes every send (`CommandBus.send`/`send_batch`, with or without
`conn=`, and the sync bus) put the current span's W3C trace context (`traceparent`,
`tracestate`, through the globally configured propagator) in the command's queue message
under `trace_context`. `instrument(worker)` reads those contexts once per claimed batch (one
statement, on a connection of its own) and runs each handler inside a CONSUMER span named
`process {queue}`, child of the sender's span and linked to it, with the messaging semantic
conventions' attributes (`messaging.system`, `messaging.operation.type` = `process`,
`messaging.destination.name`, `messaging.message.id`, `messaging.message.conversation_id`)
and `rcmd.*` ones (command id and type, attempt, outcome). A run that does not end in SUCCESS
sets the span's status to ERROR. The span is the current one inside the handler (`async def`
or plain `def`: the worker runs those in its threads in the caller's context).

Nothing here is imported by `import commandbus`; without instrumentation nothing is paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "commandbus.tracing needs opentelemetry-api: pip install 'reliable-commands[otel]'"
    ) from exc

import psycopg

from commandbus import _db, _sql, _validation
from commandbus._dsn import pool_conninfo
from commandbus._observe import BaseObserver

if TYPE_CHECKING:
    from commandbus import _native
    from commandbus.models import Command, HandlerContext
    from commandbus.sync.worker import SyncWorker
    from commandbus.worker import Worker

logger = logging.getLogger(__name__)

TRACER_NAME = "commandbus"
#: Longest wait for a batch's trace contexts (seconds) before its handlers start unlinked.
READ_TIMEOUT = 2.0
MESSAGING_SYSTEM = "pgmq"


def _current_carrier() -> dict[str, str] | None:
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def instrument_sending() -> None:
    """From now on, messages sent in this process carry the current trace context."""
    _validation.message_trace_context = _current_carrier


def uninstrument_sending() -> None:
    _validation.message_trace_context = None


class _TracingObserver(BaseObserver):
    """A CONSUMER span around each handler run of one worker."""

    def __init__(self, tracer: trace.Tracer, domain: str, queue: str) -> None:
        self._tracer = tracer
        self._queue = queue
        self._span_name = f"process {queue}"
        self._query = _sql.statement("message_trace_contexts").replace(
            "{queue_table}", f'"q_{queue}"'
        )
        # One connection of its own, opened at the first batch: the read of each claimed
        # batch's trace contexts takes no connection from the worker's pool.
        self._connect_args: tuple[str, dict[str, Any]] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._carriers: dict[int, dict[str, str]] = {}

    def attach(self, worker: Worker, native: _native.NativeWorker) -> None:
        pool = worker._pool
        kwargs = pool.kwargs if isinstance(pool.kwargs, dict) else {}
        self._connect_args = (pool_conninfo(pool), dict(kwargs))
        self._carriers = {}

    async def claimed(self, batch: Sequence[Any]) -> None:
        """Reads the batch's trace contexts; on failure or after `READ_TIMEOUT` the batch's
        spans start unlinked (logged), and the connection is opened again for the next one."""
        if self._connect_args is None:
            return
        try:
            rows = await asyncio.wait_for(self._read(batch), READ_TIMEOUT)
        except Exception as exc:  # TimeoutError, OperationalError, DatabaseError...
            await self._close()
            logger.warning(
                "tracing of %s: trace contexts not read (%s): this batch's spans are unlinked",
                self._queue, exc or type(exc).__name__,
            )  # fmt: skip
            return
        for msg_id, carrier in rows:
            if isinstance(carrier, dict):
                self._carriers[msg_id] = {str(k): str(v) for k, v in carrier.items()}

    async def _read(self, batch: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed:
            assert self._connect_args is not None
            conninfo, kwargs = self._connect_args
            kwargs.update(autocommit=True, application_name=f"rcmd tracing {self._queue}")
            self._conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        return await _db.fetch_all_text(self._conn, self._query, [item[0] for item in batch])

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def started(self, command: Command, context: HandlerContext, item: Any) -> Any:
        carrier = self._carriers.pop(context.msg_id, None)
        parent = propagate.extract(carrier) if carrier else None
        links = None
        if parent is not None:
            sender = trace.get_current_span(parent).get_span_context()
            links = [Link(sender)] if sender.is_valid else None
        span = self._tracer.start_span(
            self._span_name,
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": self._queue,
                "messaging.message.id": str(context.msg_id),
                "messaging.message.conversation_id": str(command.correlation_id),
                "rcmd.domain": command.domain,
                "rcmd.command.id": str(command.command_id),
                "rcmd.command.type": command.command_type,
                "rcmd.attempt": context.attempt,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def finished(self, token: Any, outcome_kind: str) -> None:
        if token is None:
            return
        span, ctx_token = token
        span.set_attribute("rcmd.outcome", outcome_kind)
        if outcome_kind != "SUCCESS":
            span.set_status(Status(StatusCode.ERROR, outcome_kind))
        span.end()
        otel_context.detach(ctx_token)

    async def detach(self, worker: Worker, native: _native.NativeWorker) -> None:
        self._carriers.clear()
        await self._close()


def instrument(
    worker: Worker | SyncWorker, tracer_provider: trace.TracerProvider | None = None
) -> None:
    """Run each of `worker`'s handlers in a span (from its next `run()` on), using
    `tracer_provider` (default: the global one)."""
    tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    worker.add_observer(_TracingObserver(tracer, worker.domain, worker.queue_name))


__all__ = ["instrument", "instrument_sending", "uninstrument_sending"]
