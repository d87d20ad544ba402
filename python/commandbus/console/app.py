"""The console's FastAPI application: shared state, authentication, CSRF, templates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from psycopg_pool import AsyncConnectionPool

from commandbus.bus import CommandBus
from commandbus.console.jobs import Jobs
from commandbus.console.security import CSRF_COOKIE, SESSION_COOKIE, Guard
from commandbus.console.settings import ConsoleSettings
from commandbus.exceptions import CommandBusError, CommandNotFoundError, InvalidOperationError
from commandbus.ops.monitor import Monitor
from commandbus.ops.troubleshooting import TroubleshootingQueue
from commandbus.process.repository import PostgresProcessRepository
from commandbus.setup import setup_database

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(str(files("commandbus.console")))


@dataclass
class Console:
    """What the routes share: the pool and the library objects built on it."""

    settings: ConsoleSettings
    pool: AsyncConnectionPool[Any]
    guard: Guard
    templates: Jinja2Templates
    monitor: Monitor
    tsq: TroubleshootingQueue
    bus: CommandBus
    processes: PostgresProcessRepository
    jobs: Jobs = field(default_factory=Jobs)

    def render(
        self, request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> HTMLResponse:
        ctx = {
            "read_only": self.settings.read_only,
            "csrf_token": self.guard.csrf_token(request),
            "path": request.url.path,
            "msg": request.query_params.get("msg"),
            "err": request.query_params.get("err"),
            "operator": request.cookies.get("rcmd_operator", ""),
            **context,
        }
        return self.templates.TemplateResponse(request, name, ctx, status_code=status_code)


def get_console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def redirect(path: str, **query: Any) -> RedirectResponse:
    q = {k: v for k, v in query.items() if v not in (None, "")}
    sep = "&" if "?" in path else "?"
    return RedirectResponse(path + (sep + urlencode(q) if q else ""), status_code=303)


# -- template filters -----------------------------------------------------------------------


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _ts(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _pretty(value: Any) -> str:
    if value is None:
        return "—"
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(PACKAGE_DIR / "templates"))
    env = templates.env
    env.autoescape = True  # every value is HTML-escaped unless a template says otherwise
    env.filters["num"] = _num
    env.filters["ts"] = _ts
    env.filters["duration"] = _duration
    env.filters["pretty"] = _pretty
    env.globals["status_class"] = lambda s: str(getattr(s, "value", s) or "").lower()
    return templates


# -- the application ------------------------------------------------------------------------

Background = Callable[[Console], Coroutine[Any, Any, None]]


def create_app(
    settings: ConsoleSettings,
    *,
    dsn: str | None = None,
    pool: AsyncConnectionPool[Any] | None = None,
    setup_schema: bool | None = None,
    background: Background | None = None,
) -> FastAPI:
    """The console application on `pool` (used as given, not closed) or on a pool of `dsn`.

    `setup_schema` (default: not read-only) brings the schema up to date at start
    (`setup_database`, idempotent). `background(console)` runs as a task while the app runs
    (the in-process demo worker).
    """
    settings.check()
    if (pool is None) == (dsn is None):
        raise ValueError("give exactly one of dsn and pool")
    do_setup = (not settings.read_only) if setup_schema is None else setup_schema

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_pool = pool is None
        p: AsyncConnectionPool[Any] = (
            pool
            if pool is not None
            else AsyncConnectionPool(
                dsn or "",
                min_size=1,
                max_size=8,
                open=False,
                kwargs={"application_name": "rcmd console"},
            )
        )
        if own_pool:
            await p.open(wait=True)
        if do_setup:
            await setup_database(p)
        console = Console(
            settings=settings,
            pool=p,
            guard=Guard(settings),
            templates=make_templates(),
            # One throughput read serves the dashboard's two fragments and every viewer for
            # 2 s (its buckets are 10 s wide).
            monitor=Monitor(p, reuse_seconds=2.0),
            tsq=TroubleshootingQueue(p),
            bus=CommandBus(p),
            processes=PostgresProcessRepository(p),
        )
        app.state.console = console
        task: asyncio.Task[None] | None = (
            asyncio.create_task(background(console)) if background is not None else None
        )
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await console.jobs.close()
            await console.bus.close()
            if own_pool:
                await p.close()

    app = FastAPI(
        title="rcmd console", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.mount("/static", StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static")

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        console: Console = request.app.state.console
        g = console.guard
        if request.url.path == "/login":
            if g.token_ok(request.query_params.get("token")):
                resp: Response = RedirectResponse("/", status_code=303)
                resp.set_cookie(SESSION_COOKIE, g.session_value(), httponly=True, samesite="strict")
                return resp
            return PlainTextResponse("wrong or missing token", status_code=401)
        if not request.url.path.startswith("/static/"):
            user = g.authenticated_user(request)
            if user is None:
                headers = (
                    {"WWW-Authenticate": 'Basic realm="rcmd console"'}
                    if settings.username is not None
                    else {}
                )
                return PlainTextResponse(
                    "authentication required (basic auth, a bearer token, or /login?token=...)",
                    status_code=401,
                    headers=headers,
                )
            request.state.user = user
        response = await call_next(request)
        new = getattr(request.state, "new_csrf", None)
        if new is not None:
            response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="strict")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; frame-ancestors 'none'",
        )
        return response

    from commandbus.console import actions, pages

    @app.exception_handler(actions.Refused)
    async def refused(request: Request, exc: Exception) -> Response:
        console: Console = request.app.state.console
        status = exc.status if isinstance(exc, actions.Refused) else 403
        return console.render(
            request, "error.html", {"title": "Refused", "error": str(exc)}, status_code=status
        )

    @app.exception_handler(CommandBusError)
    async def bad_input(request: Request, exc: Exception) -> Response:
        console: Console = request.app.state.console
        status = 404 if isinstance(exc, CommandNotFoundError) else 400
        if isinstance(exc, InvalidOperationError):
            status = 409
        return console.render(
            request, "error.html", {"title": "Error", "error": str(exc)}, status_code=status
        )

    app.include_router(pages.router)
    app.include_router(actions.router)
    return app
