"""What the commands of `rcmd` share: the database option and connection, bad input turned into
one line on stderr (`CliError`), durations, JSON input, and table or JSON output."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import getpass
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar
from uuid import UUID

import psycopg
import typer
from psycopg_pool import AsyncConnectionPool
from rich.console import Console
from rich.table import Table

from commandbus import _db
from commandbus._dsn import redact_dsn

T = TypeVar("T")

#: Seconds to wait for the server to answer before `rcmd` gives up on a DSN.
CONNECT_TIMEOUT_S = 10


def _width() -> int | None:
    """The terminal's width; into a pipe or a file, a wide one (rich's 80 columns would fold
    every UUID column) unless COLUMNS says otherwise."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 200


stdout = Console(highlight=False, soft_wrap=True, width=_width())
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """Bad input or an unusable environment: printed as one `error: ...` line on stderr, and
    the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- options shared by the commands ---------------------------------------------------------

DsnOption = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar="DATABASE_URL",
        show_envvar=True,
        help="PostgreSQL URL or libpq conninfo of the commandbus database.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (one document) instead of a table.")
]


def require_dsn(dsn: str | None) -> str:
    if not dsn:
        raise CliError("no database given: pass --dsn or set DATABASE_URL")
    return dsn


def redact(dsn: str) -> str:
    """The DSN with its password hidden, for messages (the library's one redaction)."""
    return redact_dsn(dsn)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine on a fresh event loop."""
    return asyncio.run(coro)


async def probe(dsn: str) -> None:
    """Connect once, so that a DSN that does not answer (or does not parse) is one clear line
    rather than a pool that retries until its timeout."""
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise CliError(f"cannot connect to {redact(dsn)}: {first_line(exc)}") from exc
    await conn.close()


@asynccontextmanager
async def open_pool(
    dsn: str | None, *, require_schema: bool = True, max_size: int = 4
) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """An open pool on the database, checked first: it answers, and (`require_schema`) it has
    the commandbus schema."""
    url = require_dsn(dsn)
    await probe(url)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url, min_size=1, max_size=max_size, open=False, timeout=CONNECT_TIMEOUT_S
    )
    await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    try:
        if require_schema and not await _db.fetch_value(pool, "schema_exists"):
            raise CliError(
                f"the commandbus schema is not installed in {redact(url)}: run `rcmd setup`"
            )
        yield pool
    finally:
        await pool.close()


async def known_domains(pool: AsyncConnectionPool[Any]) -> list[str]:
    """The domains that have a command queue."""
    from commandbus.ops.monitor import Monitor

    return await Monitor(pool).domains()


async def check_domain(pool: AsyncConnectionPool[Any], domain: str) -> str:
    """`domain`, when it has a command queue; else a CliError naming the known ones."""
    domains = await known_domains(pool)
    if domain not in domains:
        known = ", ".join(domains) if domains else "none yet"
        raise CliError(f"unknown domain {domain!r} (no queue {domain}__commands; known: {known})")
    return domain


# -- input ----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_UNIT_SECONDS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_duration(text: str, option: str) -> timedelta:
    """`30d`, `12h`, `1d12h`, `90m`, `45s`, `2w` (a bare number is seconds)."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return timedelta(seconds=float(value))
    parts = _DURATION_PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise CliError(
            f"invalid {option} {text!r}: expected a duration such as 30d, 12h, 1d12h, 90m or 45s"
        )
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


def parse_json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"invalid {option}: malformed JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CliError(f"invalid {option}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_uuid(text: str, what: str) -> UUID:
    try:
        return UUID(text)
    except ValueError as exc:
        raise CliError(f"invalid {what} {text!r}: not a UUID") from exc


def parse_datetime(text: str | None, option: str) -> datetime | None:
    """An ISO 8601 timestamp (UTC when it names no zone), or a duration meaning that long ago."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        try:
            return datetime.now(UTC) - parse_duration(text, option)
        except CliError:
            raise CliError(
                f"invalid {option} {text!r}: expected an ISO timestamp "
                "(2026-01-31T12:00:00+00:00) or an age (30m, 2h, 7d)"
            ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def default_operator() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return os.environ.get("USER") or "unknown"


def confirm(question: str, yes: bool) -> None:
    """Ask before a bulk action (unless `--yes`); no means exit 1 with nothing done."""
    if yes:
        return
    try:
        agreed = typer.confirm(question, default=False, err=True)
    except typer.Abort:  # no answer (stdin closed)
        agreed = False
    if not agreed:
        raise CliError("not confirmed (--yes skips the question): nothing done")


# -- output ---------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A value JSON can carry: dataclasses as dicts, enums as their value, UUIDs and times as
    strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    # print, not rich: a JSON document for machines stays byte-exact (no wrapping, no markup)
    typer.echo(json.dumps(plain(value), indent=2, default=str))


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, dict | list):
        return json.dumps(plain(value))
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


MIN_TABLE_WIDTH = 100
#: Ids stay whole (a folded UUID cannot be copied); the other columns wrap, free text first.
_NO_WRAP = frozenset(
    {"command_id", "batch_id", "domain", "type", "status", "time", "created", "updated"}
)
#: Free text: these columns give way first on a narrow terminal.
_FREE_TEXT = frozenset({"error", "details", "detail", "name", "last error"})


def print_table(
    title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str = ""
) -> None:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for name in columns:
        table.add_column(
            name,
            overflow="fold",
            no_wrap=name in _NO_WRAP,
            ratio=3 if name in _FREE_TEXT else None,
            min_width=10 if name in _FREE_TEXT else len(name),
        )
    count = 0
    for row in rows:
        table.add_row(*(cell(v) for v in row))
        count += 1
    if count == 0 and empty:
        stdout.print(empty)
        return
    # Never narrower than 100 columns: on a narrow terminal the lines wrap, but the ids stay
    # whole (rich would crop them to fit).
    out = stdout
    if stdout.width < MIN_TABLE_WIDTH:
        out = Console(
            file=stdout.file, width=MIN_TABLE_WIDTH, highlight=False, soft_wrap=True,
            force_terminal=stdout.is_terminal,
        )  # fmt: skip
    out.print(table)


def print_fields(title: str, fields: Sequence[tuple[str, Any]]) -> None:
    """One record as `name: value` lines."""
    stdout.print(f"[bold]{title}[/bold]")
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        stdout.print(f"  {name:<{width}}  {cell(value)}", markup=False)
