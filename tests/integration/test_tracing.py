"""OpenTelemetry: the trace context travels in the message (both send paths), each handler
run is a CONSUMER span, child of the sender's span and linked to it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import pytest
from itest_helpers import fetch, wait_until
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BusinessRuleException,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    Worker,
    _validation,
)
from commandbus import tracing as rcmd_tracing
from commandbus.metrics import WorkerMetrics
from commandbus.metrics import instrument as instrument_metrics

DOMAIN = "traced"


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    rcmd_tracing.instrument_sending()
    try:
        yield provider, memory
    finally:
        rcmd_tracing.uninstrument_sending()
        provider.shutdown()


async def _messages(pool: AsyncConnectionPool[Any]) -> list[dict[str, Any]]:
    rows = await fetch(pool, f"SELECT message FROM pgmq.q_{DOMAIN}__commands ORDER BY msg_id")
    return [r[0] for r in rows]


async def test_handler_spans_continue_the_senders_trace(
    pool: AsyncConnectionPool[Any], exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    tracer = provider.get_tracer("test")
    bus = CommandBus(pool)
    seen_in_handler: dict[str, int] = {}
    registry = HandlerRegistry()

    @registry.handler(DOMAIN, "Traced")
    async def traced(cmd: Command, ctx: HandlerContext) -> None:
        seen_in_handler[str(cmd.command_id)] = trace.get_current_span().get_span_context().span_id

    @registry.handler(DOMAIN, "Refused")
    async def refused(cmd: Command, ctx: HandlerContext) -> None:
        raise BusinessRuleException("NO", "refused")

    with tracer.start_as_current_span("request") as sender:
        sent = await bus.send(DOMAIN, "Traced", uuid4(), {"a": 1})
        async with pool.connection() as conn:  # the transactional send path
            in_tx = await bus.send(DOMAIN, "Refused", uuid4(), {"b": 2}, conn=conn)
    untraced = await bus.send(DOMAIN, "Traced", uuid4(), {"c": 3})

    messages = await _messages(pool)
    carriers = [m.get("trace_context") for m in messages]
    sender_ctx = sender.get_span_context()
    trace_hex = format(sender_ctx.trace_id, "032x")
    assert carriers[0] is not None and trace_hex in carriers[0]["traceparent"]
    assert carriers[1] is not None and trace_hex in carriers[1]["traceparent"]
    assert carriers[2] is None  # no span was current

    worker = Worker(pool, DOMAIN, registry)
    rcmd_tracing.instrument(worker, tracer_provider=provider)
    metrics_registry = CollectorRegistry()
    instrument_metrics(worker, WorkerMetrics(metrics_registry))  # two observers, combined
    task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))

    async def three_spans() -> bool:
        return len([s for s in memory.get_finished_spans() if s.kind is SpanKind.CONSUMER]) == 3

    await wait_until(three_spans)
    await worker.stop(timeout=5)
    await task

    spans: dict[str, ReadableSpan] = {
        str(s.attributes["rcmd.command.id"]): s  # type: ignore[index]
        for s in memory.get_finished_spans()
        if s.kind is SpanKind.CONSUMER
    }
    ok = spans[str(sent.command_id)]
    assert ok.name == f"process {DOMAIN}__commands"
    assert ok.context.trace_id == sender_ctx.trace_id
    assert ok.parent is not None and ok.parent.span_id == sender_ctx.span_id
    assert [link.context.span_id for link in ok.links] == [sender_ctx.span_id]
    attrs = dict(ok.attributes or {})
    assert attrs["messaging.system"] == "pgmq"
    assert attrs["messaging.operation.type"] == "process"
    assert attrs["messaging.destination.name"] == f"{DOMAIN}__commands"
    assert attrs["messaging.message.id"] == str(sent.msg_id)
    assert attrs["rcmd.command.type"] == "Traced"
    assert attrs["rcmd.attempt"] == 1
    assert attrs["rcmd.outcome"] == "SUCCESS"
    assert ok.status.status_code is StatusCode.UNSET
    assert seen_in_handler[str(sent.command_id)] == ok.context.span_id  # current in the handler

    refused_span = spans[str(in_tx.command_id)]
    assert refused_span.context.trace_id == sender_ctx.trace_id
    assert refused_span.status.status_code is StatusCode.ERROR
    assert refused_span.attributes["rcmd.outcome"] == "BUSINESS_RULE"  # type: ignore[index]

    labels = {"domain": DOMAIN, "command_type": "Traced"}
    assert metrics_registry.get_sample_value("rcmd_commands_completed_total", labels) == 2
    labels["command_type"] = "Refused"
    assert metrics_registry.get_sample_value("rcmd_commands_failed_total", labels) == 1

    alone = spans[str(untraced.command_id)]
    assert alone.parent is None and not alone.links
    assert alone.context.trace_id != sender_ctx.trace_id


async def test_nothing_is_added_without_instrumentation(pool: AsyncConnectionPool[Any]) -> None:
    assert _validation.message_trace_context is None
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("request"):
        await CommandBus(pool).send(DOMAIN, "Traced", uuid4(), {"a": 1})
    provider.shutdown()
    (message,) = await _messages(pool)
    assert "trace_context" not in message


async def test_unreadable_trace_contexts_leave_spans_unlinked_and_work_going(
    pool: AsyncConnectionPool[Any],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider, memory = exporter
    # the observer's own connection goes nowhere; the worker's are fine
    dead = "host=127.0.0.1 port=9 dbname=x connect_timeout=1"
    monkeypatch.setattr(rcmd_tracing, "pool_conninfo", lambda _pool: dead)
    registry = HandlerRegistry()

    @registry.handler(DOMAIN, "Traced")
    async def traced(cmd: Command, ctx: HandlerContext) -> None:
        return None

    with provider.get_tracer("test").start_as_current_span("request"):
        sent = await CommandBus(pool).send(DOMAIN, "Traced", uuid4(), {})
    worker = Worker(pool, DOMAIN, registry)
    rcmd_tracing.instrument(worker, tracer_provider=provider)
    task = asyncio.create_task(worker.run(concurrency=2, poll_interval=0.05))

    async def done() -> bool:
        rows = await fetch(
            pool, "SELECT status FROM commandbus.command WHERE command_id = %s", sent.command_id
        )
        return rows[0][0] == "COMPLETED"

    await wait_until(done)
    await worker.stop(timeout=5)
    await task
    (span,) = [s for s in memory.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert span.parent is None and not span.links
    assert "trace contexts not read" in caplog.text


def test_sync_worker_def_handlers_run_inside_their_span(
    database_url: str, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    from psycopg_pool import ConnectionPool

    from commandbus.sync import SyncCommandBus, SyncWorker

    provider, memory = exporter
    seen: list[int] = []
    registry = HandlerRegistry()

    @registry.handler(DOMAIN, "Plain")
    def plain(cmd: Command, ctx: HandlerContext) -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)

    with ConnectionPool(database_url, min_size=1, max_size=2, open=True) as spool:
        with provider.get_tracer("test").start_as_current_span("request") as sender:
            sync_bus = SyncCommandBus(spool)
            sync_bus.send(DOMAIN, "Plain", uuid4(), {})
        worker = SyncWorker(spool, DOMAIN, registry)
        rcmd_tracing.instrument(worker, tracer_provider=provider)
        thread = threading.Thread(target=worker.run, kwargs={"poll_interval": 0.05})
        thread.start()
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.stop(timeout=5)
        thread.join(10)
    (span,) = [s for s in memory.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert seen == [span.context.span_id]
    assert span.context.trace_id == sender.get_span_context().trace_id
