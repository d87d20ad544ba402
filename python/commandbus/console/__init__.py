"""The operator console: a web application over the bus's database (FastAPI, Jinja2 pages,
htmx for the live parts, served by uvicorn). Install the extra:
``pip install 'reliable-commands[console]'``.

    python -m commandbus.console --dsn postgresql://...      # or DATABASE_URL
    python -m commandbus.console --embedded --demo-worker    # a private server and a worker

`serve()` is the entry point the CLI calls. It listens on 127.0.0.1 unless told otherwise; any
other address needs credentials from the environment (see `commandbus.console.settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from commandbus.console.settings import ConsoleSettings
from commandbus.exceptions import ValidationError

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

EXTRA_HINT = "the console needs its extra: pip install 'reliable-commands[console]'"


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{EXTRA_HINT} ({exc.name} is missing)", name=exc.name) from exc


def create_app(settings: ConsoleSettings, **kwargs: Any) -> FastAPI:
    """The console's ASGI application (see `commandbus.console.app.create_app`)."""
    _require_extra()
    from commandbus.console.app import create_app as _create

    return _create(settings, **kwargs)


async def _demo_worker(console: Any, concurrency: int) -> None:
    """A worker of the E2E domain on its own pool, whose connections are named as the
    engine's workers name theirs (`rcmd worker <domain> <host>:<pid>`: the dashboard lists it)."""
    import socket

    from psycopg.conninfo import make_conninfo
    from psycopg_pool import AsyncConnectionPool

    from commandbus._dsn import pool_conninfo
    from commandbus.e2e import DOMAIN, registry
    from commandbus.worker import Worker

    name = f"rcmd worker {DOMAIN} {socket.gethostname()}:{os.getpid()}"
    conninfo = make_conninfo(pool_conninfo(console.pool), application_name=name)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        conninfo, min_size=1, max_size=4, open=False
    )
    await pool.open(wait=True)
    worker = Worker(pool, DOMAIN, registry)
    try:
        await worker.run(concurrency=concurrency)
    finally:
        with contextlib.suppress(Exception):
            await worker.stop(timeout=5)
        await pool.close()


def serve(
    *,
    dsn: str | None = None,
    embedded: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    read_only: bool = False,
    demo_worker: int = 0,
    log_level: str = "info",
) -> None:
    """Serve the console until interrupted (blocking).

    The database: `dsn`, else ``DATABASE_URL``, else (with `embedded`) a private PostgreSQL
    started for the run. `demo_worker` > 0 also runs, in this process, a worker of the E2E
    domain with that concurrency (the probabilistic handler of `commandbus.e2e`).

    Raises:
        ValidationError: a bad setting, named: a non-loopback `host` without credentials in
            the environment, no database given, both `dsn` and `embedded`...
        ImportError: the ``console`` extra is not installed.
    """
    settings = ConsoleSettings.from_env(host=host, port=port, read_only=read_only)
    url = dsn or (None if embedded else os.environ.get("DATABASE_URL") or None)
    if dsn and embedded:
        raise ValidationError("embedded", embedded, "give either a DSN or --embedded, not both")
    if url is None and not embedded:
        raise ValidationError(
            "dsn", None, "no database: give --dsn, set DATABASE_URL, or use --embedded"
        )
    if isinstance(demo_worker, bool) or not isinstance(demo_worker, int) or demo_worker < 0:
        raise ValidationError("demo_worker", demo_worker, "must be an integer >= 0")
    _require_extra()
    import uvicorn

    server = None
    if url is None:
        from commandbus.embedded import EmbeddedServer

        logger.info("starting an embedded PostgreSQL server")
        server = EmbeddedServer().start()
        url = server.dsn
    try:
        background = None
        if demo_worker > 0:

            async def background(console: Any) -> None:
                await _demo_worker(console, demo_worker)

        app = create_app(settings, dsn=url, background=background)
        shown = f"[{host}]" if ":" in host else host
        logger.info("rcmd console on http://%s:%d/", shown, port)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        asyncio.run(uvicorn.Server(config).serve())
    finally:
        if server is not None:
            server.stop()


__all__ = ["EXTRA_HINT", "ConsoleSettings", "create_app", "serve"]
