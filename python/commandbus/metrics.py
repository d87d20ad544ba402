"""Prometheus metrics of workers and queues (the `metrics` extra: prometheus-client).

    from commandbus.metrics import instrument, start_metrics_server

    instrument(worker)                      # before worker.run(); Worker or SyncWorker
    server = start_metrics_server(9100, dsn=dsn, domains=["orders"])
    ...
    server.close()

Per domain and command type, counted by the worker's Rust engine as each outcome is reported
(nothing is added to the Python path of a command) and published into the metrics about once a
second and when the worker stops: `rcmd_commands_completed_total`, `rcmd_commands_failed_total`
(business-rule failures), `rcmd_commands_retried_total`, `rcmd_commands_tsq_total` (sent to
the troubleshooting queue: permanent errors and exhausted retries);
`rcmd_handler_duration_seconds` (histogram: from the command's hand-off to the worker's event
loop until its outcome is reported, so a saturated event loop shows here too) and
`rcmd_command_queue_wait_seconds` (histogram: from the send to the hand-off of the first
attempt).
Per domain, read at each publish (never per command): `rcmd_handlers_in_flight` (the
worker's handler tasks), and from the Rust engine's counters `rcmd_claims_total`,
`rcmd_claim_seconds_total`, `rcmd_claimed_commands_total`, `rcmd_flushes_total`,
`rcmd_flush_seconds_total`,
`rcmd_flushed_outcomes_total`, `rcmd_flush_errors_total`, `rcmd_outcomes_fenced_total`
(mean claim latency: `rate(rcmd_claim_seconds_total[1m]) / rate(rcmd_claims_total[1m])`; mean
claim batch: `rate(rcmd_claimed_commands_total[1m]) / rate(rcmd_claims_total[1m])`; the same
for flushes). Read from the database at scrape time, when the server is given `dsn` and
`domains` (one statement per scrape): `rcmd_queue_messages`, `rcmd_tsq_commands`,
`rcmd_queue_oldest_message_age_seconds`, `rcmd_queue_scrape_ok`.

Several worker processes (`rcmd worker --processes N`): set `PROMETHEUS_MULTIPROC_DIR` to an
empty directory in the supervisor before anything imports prometheus_client; each child calls
`instrument(worker)`; the supervisor serves the aggregate with `start_metrics_server` and calls
`mark_process_dead(pid)` when a child exits.

In an existing app, serve `metrics_registry(dsn=..., domains=[...])` with prometheus-client's
own exposition, e.g. `app.mount("/metrics", prometheus_client.make_asgi_app(registry))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg

try:
    from prometheus_client import (
        REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        multiprocess,
    )
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.exposition import make_wsgi_app
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "commandbus.metrics needs prometheus-client: pip install 'reliable-commands[metrics]'"
    ) from exc

from commandbus import _db
from commandbus._observe import BaseObserver
from commandbus._sql import command_queue
from commandbus._validation import validate_domain

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from commandbus import _native
    from commandbus.health import WorkerHealth
    from commandbus.sync.worker import SyncWorker
    from commandbus.worker import Worker

logger = logging.getLogger(__name__)

#: How often a running worker publishes what it counted into the metrics (seconds).
PUBLISH_INTERVAL = 1.0

_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Engine counter (key of NativeWorker.stats()) -> (metric attribute, scale to base units).
_ENGINE_COUNTERS = (
    ("claims", "claims", 1.0),
    ("claim_micros", "claim_seconds", 1e-6),
    ("claimed", "claimed", 1.0),
    ("flushes", "flushes", 1.0),
    ("flush_micros", "flush_seconds", 1e-6),
    ("applied", "flushed", 1.0),
    ("fenced", "flushed", 1.0),
    ("flush_errors", "flush_errors", 1.0),
    ("fenced", "fenced", 1.0),
)


def multiprocess_mode() -> bool:
    """True when prometheus_client writes its values to `PROMETHEUS_MULTIPROC_DIR`."""
    return bool(os.environ.get(_MULTIPROC_ENV))


class WorkerMetrics:
    """The metric objects workers update. One per registry (prometheus-client refuses a name
    registered twice); `instrument` uses a shared default on `prometheus_client.REGISTRY`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = REGISTRY if registry is None else registry
        by_type = ("domain", "command_type")
        self.completed = Counter(
            "rcmd_commands_completed", "Commands whose handler succeeded.", by_type, registry=r
        )
        self.failed = Counter(
            "rcmd_commands_failed", "Commands FAILED by a business rule.", by_type, registry=r
        )
        self.retried = Counter(
            "rcmd_commands_retried", "Handler runs that failed and will be retried.", by_type,
            registry=r,
        )  # fmt: skip
        self.tsq = Counter(
            "rcmd_commands_tsq",
            "Commands sent to the troubleshooting queue (permanent error or retries exhausted).",
            by_type,
            registry=r,
        )
        self.handler_duration = Histogram(
            "rcmd_handler_duration_seconds", "Handler run time.", by_type, registry=r
        )
        self.queue_wait = Histogram(
            "rcmd_command_queue_wait_seconds",
            "Time from the send to the start of the command's first handler run.",
            by_type,
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "rcmd_handlers_in_flight",
            "Commands claimed and not yet reported (handlers running or about to).",
            ("domain",),
            registry=r,
            multiprocess_mode="livesum",
        )
        per_domain = ("domain",)
        self.claims = Counter("rcmd_claims", "Claim statements run.", per_domain, registry=r)
        self.claim_seconds = Counter(
            "rcmd_claim_seconds", "Summed latency of the claim statements.", per_domain, registry=r
        )
        self.claimed = Counter("rcmd_claimed_commands", "Commands claimed.", per_domain, registry=r)
        self.flushes = Counter("rcmd_flushes", "Outcome flushes applied.", per_domain, registry=r)
        self.flush_seconds = Counter(
            "rcmd_flush_seconds", "Summed latency of the applied flushes.", per_domain, registry=r
        )
        self.flushed = Counter(
            "rcmd_flushed_outcomes", "Outcomes in the applied flushes.", per_domain, registry=r
        )
        self.flush_errors = Counter(
            "rcmd_flush_errors", "Failed flush attempts (each is retried).", per_domain,
            registry=r,
        )  # fmt: skip
        self.fenced = Counter(
            "rcmd_outcomes_fenced",
            "Outcomes the fence rejected (their lease had expired and moved on).",
            per_domain,
            registry=r,
        )


_default: WorkerMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> WorkerMetrics:
    """The shared `WorkerMetrics` on `prometheus_client.REGISTRY`."""
    global _default
    with _default_lock:
        if _default is None:
            _default = WorkerMetrics()
        return _default


def _add_histogram(child: Any, buckets: Sequence[int], total: float) -> None:
    """Adds observations counted elsewhere (per bucket, not cumulative, one per upper bound of
    `child` with +Inf last) to a prometheus-client histogram child. prometheus-client keeps one
    (non-cumulative) value per bucket and the sum, each of which works in multiprocess mode
    too; its own `observe` adds 1 to the same ones."""
    for value, n in zip(child._buckets, buckets, strict=True):
        if n:
            value.inc(n)
    if total:
        child._sum.inc(total)


class _TypeMetrics:
    """The metric children of one (domain, command type)."""

    __slots__ = ("counters", "duration", "wait")

    def __init__(self, m: WorkerMetrics, domain: str, command_type: str) -> None:
        tsq = m.tsq.labels(domain, command_type)
        # In the order of the engine's outcome kinds (SUCCESS, BUSINESS_RULE, RETRY,
        # EXHAUSTED, PERMANENT).
        self.counters = (
            m.completed.labels(domain, command_type),
            m.failed.labels(domain, command_type),
            m.retried.labels(domain, command_type),
            tsq,
            tsq,
        )
        self.duration = m.handler_duration.labels(domain, command_type)
        self.wait = m.queue_wait.labels(domain, command_type)


class _MetricsObserver(BaseObserver):
    """Publishes a worker's metrics about once a second while it runs, and at its end. The
    engine counts the outcomes, handler times and queue waits (per command type, in Rust:
    nothing is added to the Python path of a command), and its claim and flush figures; this
    adds what is new to the prometheus-client metrics."""

    # Counting happens in the engine: the worker runs its plain per-command path.
    per_command = False

    def __init__(self, metrics: WorkerMetrics, domain: str) -> None:
        self._m = metrics
        self._domain = domain
        self._types: dict[str, _TypeMetrics] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._last: dict[str, float] = {}
        self._in_flight = 0

    def _type(self, command_type: str) -> _TypeMetrics:
        tm = self._types.get(command_type)
        if tm is None:
            tm = self._types[command_type] = _TypeMetrics(self._m, self._domain, command_type)
        return tm

    def attach(self, worker: Worker, native: _native.NativeWorker) -> None:
        self._last = {}
        m, domain = self._m, self._domain
        for _key, attr, _scale in _ENGINE_COUNTERS:  # the series exist (at 0) from the start
            getattr(m, attr).labels(domain)
        m.in_flight.labels(domain)
        # The engine counts into buckets with the histograms' own bounds (+Inf last).
        native.enable_outcome_metrics(
            list(m.handler_duration._upper_bounds), list(m.queue_wait._upper_bounds)
        )
        self._sync_task = asyncio.get_running_loop().create_task(
            self._sync_loop(worker, native), name=f"rcmd-metrics-{self._domain}"
        )

    async def detach(self, worker: Worker, native: _native.NativeWorker) -> None:
        task, self._sync_task = self._sync_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.publish(native, 0)

    async def _sync_loop(self, worker: Worker, native: _native.NativeWorker) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL)
            self.publish(native, worker.in_flight_count)

    def publish(self, native: _native.NativeWorker, in_flight: int) -> None:
        """Adds what the engine counted since the last call to the metrics; sets the in-flight
        gauge."""
        for (
            command_type,
            kinds,
            d_buckets,
            d_sum,
            w_buckets,
            w_sum,
        ) in native.take_outcome_metrics():
            tm = self._type(command_type)
            for counter, n in zip(tm.counters, kinds, strict=True):
                if n:
                    counter.inc(n)
            _add_histogram(tm.duration, d_buckets, d_sum)
            _add_histogram(tm.wait, w_buckets, w_sum)
        self.sync_engine(native, in_flight)

    def sync_engine(self, native: _native.NativeWorker, in_flight: int) -> None:
        """Adds what the engine's claim and flush counters counted since the last call; sets
        the in-flight gauge."""
        stats = native.stats()
        m, domain, last = self._m, self._domain, self._last
        for key, attr, scale in _ENGINE_COUNTERS:
            value = stats.get(key)
            if not isinstance(value, int):
                continue
            seen = last.get(attr + ":" + key, 0.0)
            if value > seen:
                getattr(m, attr).labels(domain).inc((value - seen) * scale)
            last[attr + ":" + key] = value
        m.in_flight.labels(domain).inc(in_flight - self._in_flight)
        self._in_flight = in_flight


def instrument(worker: Worker | SyncWorker, metrics: WorkerMetrics | None = None) -> WorkerMetrics:
    """Count `worker`'s outcomes and engine activity in `metrics` (default: the shared metrics
    on `prometheus_client.REGISTRY`) from its next `run()` on. Returns the metrics."""
    m = metrics if metrics is not None else default_metrics()
    worker.add_observer(_MetricsObserver(m, worker.domain))
    return m


# -- queue state, read at scrape time ------------------------------------------------------


class QueueCollector(Collector):
    """Queue depth, oldest message age and TSQ size of `domains`, read from the database with
    one statement when scraped, on a connection of its own for that scrape, all within
    `timeout` seconds (a database that does not answer, a connection gone silent behind a
    proxy: the scrape reports `rcmd_queue_scrape_ok 0` and nothing else, and the next scrape
    starts afresh)."""

    def __init__(self, dsn: str, domains: Sequence[str], *, timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._domains = [validate_domain(d) for d in domains]
        self._timeout = timeout
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []

    async def _read(self) -> list[tuple[Any, ...]]:
        queues = [command_queue(d) for d in self._domains]
        async with asyncio.timeout(self._timeout):
            conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, int(self._timeout)),
                application_name="rcmd metrics",
                options=f"-c statement_timeout={int(self._timeout * 1000)}",
            )
            async with conn:
                return await _db.fetch_all(conn, "queue_metrics", queues)

    def _rows(self) -> list[tuple[Any, ...]]:
        # The scrape's thread has no event loop: one for this read.
        return asyncio.run(self._read())

    def collect(self) -> Iterable[Metric]:
        ok = GaugeMetricFamily(
            "rcmd_queue_scrape_ok", "1 when the queue metrics were read from the database."
        )
        with self._lock:
            try:
                rows = self._rows()
            except Exception as exc:
                logger.warning("queue metrics: cannot read the database: %s", exc or "no answer")
                ok.add_metric([], 0)
                return [ok]
        ok.add_metric([], 1)
        depth = GaugeMetricFamily(
            "rcmd_queue_messages",
            "Messages in the domain's command queue (waiting, leased or backing off).",
            labels=["domain"],
        )
        age = GaugeMetricFamily(
            "rcmd_queue_oldest_message_age_seconds",
            "Age of the oldest message in the domain's command queue (0 when empty).",
            labels=["domain"],
        )
        tsq = GaugeMetricFamily(
            "rcmd_tsq_commands", "Commands in the troubleshooting queue.", labels=["domain"]
        )
        dead = GaugeMetricFamily(
            "rcmd_queue_dead_rows",
            "Dead rows in the domain's queue table, not yet vacuumed (every lease scans past"
            " them: see the README's Vacuum section).",
            labels=["domain"],
        )
        vacuumed = GaugeMetricFamily(
            "rcmd_queue_vacuum_age_seconds",
            "Seconds since the domain's queue table was last vacuumed (absent: never).",
            labels=["domain"],
        )
        for domain, length, oldest, in_tsq, dead_rows, vacuum_age in rows:
            depth.add_metric([domain], float(length or 0))
            age.add_metric([domain], float(oldest or 0))
            tsq.add_metric([domain], float(in_tsq or 0))
            dead.add_metric([domain], float(dead_rows or 0))
            if vacuum_age is not None:
                vacuumed.add_metric([domain], float(vacuum_age))
        return [ok, depth, age, tsq, dead, vacuumed]

    def close(self) -> None:
        """Nothing stays open between scrapes (kept for the servers that call it)."""


class _Forward(Collector):
    """Another registry's metrics, inside a registry of ours."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return self._source.collect()


def metrics_registry(
    *,
    dsn: str | None = None,
    domains: Sequence[str] = (),
    registry: CollectorRegistry | None = None,
) -> CollectorRegistry:
    """A registry to serve: the multiprocess aggregate when `PROMETHEUS_MULTIPROC_DIR` is set,
    else `registry` (default `prometheus_client.REGISTRY`), plus the queue gauges of `domains`
    when `dsn` is given. Serve it with prometheus-client's `make_asgi_app(registry)`,
    `make_wsgi_app(registry)` or `generate_latest(registry)`."""
    return _registry(dsn, domains, registry)[0]


def _registry(
    dsn: str | None, domains: Sequence[str], registry: CollectorRegistry | None
) -> tuple[CollectorRegistry, QueueCollector | None]:
    served = CollectorRegistry()
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(served)  # type: ignore[no-untyped-call]
    else:
        served.register(_Forward(REGISTRY if registry is None else registry))
    queues = None
    if dsn is not None and domains:
        queues = QueueCollector(dsn, domains)
        served.register(queues)
    return served, queues


def mark_process_dead(pid: int) -> None:
    """Multiprocess mode: drop the live gauges of a worker process that exited (the
    supervisor calls it). Does nothing outside multiprocess mode."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# -- the HTTP server -----------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


class MetricsServer:
    """A running metrics endpoint (a daemon thread); `close()` stops it."""

    def __init__(
        self,
        server: _Server,
        thread: threading.Thread,
        registry: CollectorRegistry,
        queues: QueueCollector | None,
    ) -> None:
        self._server = server
        self._thread = thread
        self._queues = queues
        self.registry = registry

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        if self._queues is not None:
            self._queues.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _health_app(
    health: WorkerHealth | None, metrics: Callable[..., Iterable[bytes]]
) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if health is not None and path in ("/health/live", "/health/ready", "/health"):
            ok, body = health.http_answer(path.rsplit("/", 1)[-1])
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json")],
            )
            return [body]
        return metrics(environ, start_response)

    return app


def start_metrics_server(
    port: int,
    *,
    host: str = "127.0.0.1",
    dsn: str | None = None,
    domains: Sequence[str] = (),
    registry: CollectorRegistry | None = None,
    health: WorkerHealth | None = None,
) -> MetricsServer:
    """Serve `/metrics` on `host:port` from a daemon thread (port 0: any free port, see
    `.port`). The metrics are `metrics_registry(dsn=dsn, domains=domains, registry=registry)`'s;
    with `health`, `/health/live` and `/health/ready` answer 200 or 503 with a JSON body."""
    served, queues = _registry(dsn, domains, registry)
    app = _health_app(health, make_wsgi_app(served))
    server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name=f"rcmd-metrics-{port}", daemon=True)
    thread.start()
    logger.info("metrics served on http://%s:%d/metrics", host, server.server_address[1])
    return MetricsServer(server, thread, served, queues)


__all__ = [
    "MetricsServer",
    "QueueCollector",
    "WorkerMetrics",
    "default_metrics",
    "instrument",
    "mark_process_dead",
    "metrics_registry",
    "multiprocess_mode",
    "start_metrics_server",
]
