"""`rcmd worker MODULE[:OBJECT]`: load handlers and run a worker, or supervise several worker
processes (`--processes N`).

Supervision: the supervisor starts N child processes (`rcmd worker ... --processes 1`), each in
a session of its own (so a Ctrl-C in the terminal reaches only the supervisor, and each child
gets exactly one SIGTERM: a second one would cancel its running handlers). A child that exits
while the supervisor is not stopping is restarted, after a delay that grows while children die
young (a crash loop does not spin). SIGTERM or SIGINT to the supervisor sends SIGTERM to every
child: each stops claiming, lets its running handlers finish (up to `--stop-timeout`), applies
their outcomes and gives back what it never started; the supervisor waits for all of them and
exits 0. A child whose supervisor died (kill -9) stops itself the same way.

Metrics (`--metrics-port`, the metrics extra): with one process the worker instruments itself
and serves /metrics; with N, the supervisor points PROMETHEUS_MULTIPROC_DIR at a fresh directory
before anything imports prometheus_client, the children instrument their workers, and the
supervisor serves the aggregate (and marks dead children's files).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Annotated, Any

import typer

from commandbus.cli._common import CliError, first_line, open_pool, redact, require_dsn, run
from commandbus.handler import HandlerRegistry, get_handler_meta

logger = logging.getLogger(__name__)

#: Environment variables the options also read (granian / procrastinate style).
ENV_PREFIX = "RCMD_WORKER_"
#: Marks a child process of a supervisor.
CHILD_ENV = "RCMD_WORKER_SUPERVISED"
#: Tells a child to instrument its worker (the supervisor serves the metrics of all).
CHILD_METRICS_ENV = "RCMD_WORKER_CHILD_METRICS"
#: A child that ran at least this long before dying is restarted at once.
HEALTHY_RUN_S = 10.0
MAX_RESTART_DELAY_S = 30.0


@dataclass(frozen=True)
class WorkerOptions:
    """The worker's settings, as `rcmd worker` takes them (options or RCMD_WORKER_* variables)."""

    domain: str
    concurrency: int = 64
    processes: int = 1
    visibility_timeout: int = 30
    poll_interval: float = 1.0
    stop_timeout: float = 30.0
    sync: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"

    def child_args(self, spec: str) -> list[str]:
        """The command line of one supervised child (its DSN goes in DATABASE_URL: a password
        on a command line is visible to every user of the machine)."""
        args = [
            sys.executable, "-m", "commandbus", "worker", spec,
            "--domain", self.domain,
            "--concurrency", str(self.concurrency),
            "--processes", "1",
            "--visibility-timeout", str(self.visibility_timeout),
            "--poll-interval", str(self.poll_interval),
            "--stop-timeout", str(self.stop_timeout),
            "--log-level", self.log_level,
        ]  # fmt: skip
        if self.sync:
            args.append("--sync")
        return args


# -- loading the handlers -------------------------------------------------------------------


def _import(module_name: str) -> ModuleType:
    # As uvicorn and celery do: the current directory is importable.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise CliError(f"cannot import {module_name!r}: no module named {exc.name!r}") from exc
        raise CliError(f"importing {module_name!r} failed: {first_line(exc)}") from exc
    except Exception as exc:
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _from_module(module: ModuleType) -> HandlerRegistry:
    registry = HandlerRegistry()
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or not callable(value) or get_handler_meta(value) is None:
            continue
        registry.register_function(value)
    return registry


def load_registry(spec: str) -> HandlerRegistry:
    """The handlers named by `MODULE[:OBJECT]`: a HandlerRegistry, a module of `@handler`
    functions (MODULE alone, or an attribute that is a module), an object whose `@handler`
    methods are registered, or a callable taking no arguments that returns one of those."""
    module_name, _, attr = spec.partition(":")
    if not module_name or (":" in spec and not attr):
        raise CliError(f"invalid handlers {spec!r}: expected MODULE or MODULE:OBJECT")
    obj: Any = _import(module_name)
    for part in attr.split(".") if attr else []:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"{module_name!r} has no attribute {attr!r}") from None
    if (
        callable(obj)
        and not isinstance(obj, HandlerRegistry | ModuleType | type)
        and get_handler_meta(obj) is None
    ):
        try:
            if not inspect.signature(obj).parameters:
                obj = obj()
        except (TypeError, ValueError):
            pass
        except Exception as exc:
            raise CliError(f"{spec} raised {type(exc).__name__}: {first_line(exc)}") from exc
    if isinstance(obj, HandlerRegistry):
        registry = obj
    elif isinstance(obj, ModuleType):
        registry = _from_module(obj)
    elif not isinstance(obj, type) and obj is not None:
        registry = HandlerRegistry()
        registry.register_instance(obj)
    else:
        registry = HandlerRegistry()
    if not registry.registered_handlers() and not registry.registered_sync_handlers():
        raise CliError(
            f"{spec} holds no handlers: name a HandlerRegistry, a module of @handler "
            "functions, or an object with @handler methods"
        )
    return registry


def registry_domains(registry: HandlerRegistry) -> list[str]:
    pairs = [*registry.registered_handlers(), *registry.registered_sync_handlers()]
    return sorted({d for d, _t in pairs})


def choose_domain(registry: HandlerRegistry, spec: str, domain: str | None) -> str:
    domains = registry_domains(registry)
    if domain is None:
        if len(domains) == 1:
            return domains[0]
        raise CliError(
            f"{spec} has handlers for several domains ({', '.join(domains)}): pass --domain"
        )
    if domain not in domains:
        raise CliError(
            f"unknown domain {domain!r}: {spec} has handlers for {', '.join(domains)} only"
        )
    return domain


# -- metrics (the metrics extra) ------------------------------------------------------------


_NO_METRICS = "--metrics-port needs the metrics extra: pip install 'reliable-commands[metrics]'"


def _check_metrics_extra() -> None:
    """A missing metrics extra, found without importing it (a supervisor must not import
    prometheus_client before PROMETHEUS_MULTIPROC_DIR is set)."""
    for name in ("prometheus_client", "commandbus.metrics"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise CliError(_NO_METRICS)


def _metrics_module() -> Any:
    try:
        return importlib.import_module("commandbus.metrics")
    except ImportError as exc:
        raise CliError(_NO_METRICS) from exc


def _serve_metrics(metrics: Any, dsn: str, opts: WorkerOptions) -> Any:
    try:
        return metrics.start_metrics_server(
            opts.metrics_port, host=opts.metrics_host, dsn=dsn, domains=[opts.domain]
        )
    except OSError as exc:  # the port is taken, the address is not ours...
        raise CliError(
            f"cannot serve metrics on {opts.metrics_host}:{opts.metrics_port}: "
            f"{exc.strerror or exc}"
        ) from exc


# -- one worker process ---------------------------------------------------------------------


def _watch_parent(parent: int) -> None:
    """A supervised child whose supervisor is gone stops gracefully (SIGTERM to itself)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            logger.warning("supervisor %d is gone: stopping", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return


async def _run_async(
    dsn: str, registry: HandlerRegistry, opts: WorkerOptions, metrics: Any
) -> None:
    from commandbus.worker import Worker

    async with open_pool(dsn) as pool:
        _log_start(dsn, opts)
        worker = Worker(pool, opts.domain, registry, visibility_timeout=opts.visibility_timeout)
        if metrics is not None:
            metrics.instrument(worker)
        await worker.run(
            concurrency=opts.concurrency,
            poll_interval=opts.poll_interval,
            handle_signals=True,
            signal_stop_timeout=opts.stop_timeout,
        )


def _run_sync(dsn: str, registry: HandlerRegistry, opts: WorkerOptions, metrics: Any) -> None:
    from psycopg_pool import ConnectionPool

    from commandbus.sync import SyncWorker
    from commandbus.sync.timeouts import DEFAULT_STATEMENT_TIMEOUT_MS

    async def checked() -> None:
        async with open_pool(dsn, max_size=1):
            pass

    run(checked())
    _log_start(dsn, opts)
    statement_timeout = min(DEFAULT_STATEMENT_TIMEOUT_MS, opts.visibility_timeout * 800)
    with ConnectionPool(dsn, min_size=1, max_size=4, open=True) as pool:
        worker = SyncWorker(
            pool,
            opts.domain,
            registry,
            visibility_timeout=opts.visibility_timeout,
            statement_timeout=statement_timeout,
        )
        if metrics is not None:
            metrics.instrument(worker)
        worker.run(
            concurrency=opts.concurrency,
            poll_interval=opts.poll_interval,
            handle_signals=True,
            signal_stop_timeout=opts.stop_timeout,
        )


def _log_start(dsn: str, opts: WorkerOptions) -> None:
    logger.info(
        "worker for %s on %s (pid %d, concurrency %d%s)",
        opts.domain, redact(dsn), os.getpid(), opts.concurrency, ", sync" if opts.sync else "",
    )  # fmt: skip


def _stop_before_start(signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT before the worker runs (it installs its own handlers, which stop it
    gracefully, before it claims anything): nothing is claimed yet, so exit at once."""
    logger.info("signal %d before the worker started: exiting", signum)
    raise SystemExit(0)


def run_one(dsn: str, registry: HandlerRegistry, opts: WorkerOptions, *, supervised: bool) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_before_start)
    metrics: Any = None
    server: Any = None
    if supervised:
        threading.Thread(
            target=_watch_parent, args=(os.getppid(),), name="rcmd-parent-watch", daemon=True
        ).start()
        if os.environ.get(CHILD_METRICS_ENV) == "1":
            metrics = _metrics_module()
    elif opts.metrics_port is not None:
        metrics = _metrics_module()
        server = _serve_metrics(metrics, dsn, opts)
    try:
        if opts.sync:
            _run_sync(dsn, registry, opts, metrics)
        else:
            run(_run_async(dsn, registry, opts, metrics))
    finally:
        if server is not None:
            server.close()


# -- the supervisor -------------------------------------------------------------------------


class Supervisor:
    """Runs `count` child processes of `args`, restarts one that dies, stops all on SIGTERM."""

    def __init__(
        self,
        args: list[str],
        count: int,
        *,
        env: dict[str, str],
        stop_timeout: float,
        on_exit: Any = None,
    ) -> None:
        self._args = args
        self._count = count
        self._env = env
        self._stop_timeout = stop_timeout
        self._on_exit = on_exit
        self._stop = threading.Event()
        self._children: list[subprocess.Popen[bytes] | None] = [None] * count
        self._started_at = [0.0] * count
        self._delay = [0.0] * count
        self._due = [0.0] * count

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def _start(self, slot: int) -> None:
        child = subprocess.Popen(self._args, env=self._env, start_new_session=True)
        self._children[slot] = child
        self._started_at[slot] = time.monotonic()
        logger.info("worker process %d/%d started: pid %d", slot + 1, self._count, child.pid)

    def _reap(self, slot: int, child: subprocess.Popen[bytes]) -> None:
        lived = time.monotonic() - self._started_at[slot]
        if self._on_exit is not None:
            self._on_exit(child.pid)
        self._delay[slot] = (
            0.0
            if lived >= HEALTHY_RUN_S
            else min(MAX_RESTART_DELAY_S, max(0.5, self._delay[slot] * 2))
        )
        self._due[slot] = time.monotonic() + self._delay[slot]
        self._children[slot] = None
        logger.warning(
            "worker process %d/%d (pid %d) exited with %s after %.1f s: restarting in %.1f s",
            slot + 1, self._count, child.pid, child.returncode, lived, self._delay[slot],
        )  # fmt: skip

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        for slot in range(self._count):
            self._start(slot)
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for slot, child in enumerate(self._children):
                if child is None:
                    if now >= self._due[slot]:
                        self._start(slot)
                elif child.poll() is not None:
                    self._reap(slot, child)
        return self._stop_all()

    def _stop_all(self) -> int:
        """SIGTERM to every child (once), then wait for each; a child that outlives the stop
        timeout (+ 10 s for its final flush) is killed."""
        logger.info("stopping %d worker processes", sum(c is not None for c in self._children))
        running = [c for c in self._children if c is not None and c.poll() is None]
        for child in running:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout + 10.0
        code = 0
        for child in running:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker process pid %d did not stop: killing it", child.pid)
                child.kill()
                child.wait()
                code = 1
            if self._on_exit is not None:
                self._on_exit(child.pid)
        logger.info("all worker processes stopped")
        return code


def supervise(dsn: str, spec: str, opts: WorkerOptions) -> int:
    env = {k: v for k, v in os.environ.items() if k != CHILD_METRICS_ENV}
    env[CHILD_ENV] = "1"
    env["DATABASE_URL"] = dsn
    metrics_dir: str | None = None
    server: Any = None
    on_exit: Any = None
    try:
        if opts.metrics_port is not None:
            metrics_dir = tempfile.mkdtemp(prefix="rcmd-metrics-")
            # Before anything imports prometheus_client: it reads the variable at import. (A
            # missing extra is one line here, before any child starts.)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            env[CHILD_METRICS_ENV] = "1"
            metrics = _metrics_module()
            server = _serve_metrics(metrics, dsn, opts)
            on_exit = metrics.mark_process_dead
        supervisor = Supervisor(
            opts.child_args(spec),
            opts.processes,
            env=env,
            stop_timeout=opts.stop_timeout,
            on_exit=on_exit,
        )
        return supervisor.run()
    finally:
        if server is not None:
            server.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


# -- the command ----------------------------------------------------------------------------


def _env(name: str) -> str:
    return ENV_PREFIX + name


def worker(
    handlers: Annotated[
        str,
        typer.Argument(
            metavar="HANDLERS",
            help="MODULE[:OBJECT], where the handlers are: a HandlerRegistry "
            "(app.handlers:registry), a module of @handler functions (app.handlers), an object "
            "with @handler methods, or a function returning one of those.",
        ),
    ],
    domain: Annotated[
        str | None,
        typer.Option(
            "--domain",
            envvar=_env("DOMAIN"),
            help="The domain to work (default: the handlers' only domain).",
        ),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            envvar=_env("CONCURRENCY"),
            help="Handlers running at once, per process.",
        ),
    ] = 64,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            "-p",
            min=1,
            envvar=_env("PROCESSES"),
            help="Worker processes; more than 1 runs a supervisor that restarts a "
            "process that dies and stops all on SIGTERM.",
        ),
    ] = 1,
    visibility_timeout: Annotated[
        int,
        typer.Option(
            "--visibility-timeout",
            min=1,
            envvar=_env("VISIBILITY_TIMEOUT"),
            help="Seconds a claimed command stays invisible (its lease).",
        ),
    ] = 30,
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval",
            min=0.01,
            envvar=_env("POLL_INTERVAL"),
            help="Seconds between polls (NOTIFY wakes the worker sooner).",
        ),
    ] = 1.0,
    stop_timeout: Annotated[
        float,
        typer.Option(
            "--stop-timeout",
            min=0,
            envvar=_env("STOP_TIMEOUT"),
            help="On SIGTERM, seconds running handlers may take to finish.",
        ),
    ] = 30.0,
    sync: Annotated[
        bool,
        typer.Option(
            "--sync",
            envvar=_env("SYNC"),
            help="Run the SyncWorker (plain def handlers in threads).",
        ),
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            envvar=_env("METRICS_PORT"),
            help="Serve Prometheus metrics on this port (the metrics extra).",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host",
            envvar=_env("METRICS_HOST"),
            help="Address the metrics server listens on.",
        ),
    ] = "127.0.0.1",
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", envvar=_env("LOG_LEVEL"), help="DEBUG, INFO, WARNING or ERROR."
        ),
    ] = "INFO",
    dsn: Annotated[
        str | None,
        typer.Option(
            "--dsn",
            envvar="DATABASE_URL",
            show_envvar=True,
            help="PostgreSQL URL or libpq conninfo of the commandbus database.",
        ),
    ] = None,
) -> None:
    """Run a worker for one domain until SIGTERM or Ctrl-C (graceful: running handlers finish,
    their outcomes are applied, unstarted commands are given back)."""
    url = require_dsn(dsn)
    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise CliError(f"invalid --log-level {log_level!r}: DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(
        level=level, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )
    registry = load_registry(handlers)
    opts = WorkerOptions(
        domain=choose_domain(registry, handlers, domain),
        concurrency=concurrency,
        processes=processes,
        visibility_timeout=visibility_timeout,
        poll_interval=poll_interval,
        stop_timeout=stop_timeout,
        sync=sync,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        log_level=level,
    )
    supervised = os.environ.get(CHILD_ENV) == "1"
    if opts.processes > 1:
        if opts.metrics_port is not None:
            _check_metrics_extra()  # one line before the database is even asked

        async def checked() -> None:
            async with open_pool(url, max_size=1):
                pass

        run(checked())  # a database that does not answer: one line, no children started
        code = supervise(url, handlers, opts)
        if code:
            raise typer.Exit(code)
        return
    run_one(url, registry, opts, supervised=supervised)


def register(app: typer.Typer) -> None:
    app.command()(worker)
