"""Run the named statements of `sql/statements/` on psycopg: the one place the pure-Python
path talks to PostgreSQL.

Each function takes a connection (the statement joins the caller's transaction) or a pool (a
connection is taken for this one statement and committed when it returns), the statement's
name and its parameters (`$1`, `$2`... in order). Every `psycopg.Error` becomes our exception
(`commandbus._errors`) with the driver error as its `__cause__`.

A call on a pool has a client-side deadline (`pool_deadline`: by default 3 x the engine's
`call_timeout`, 30 s; `CommandBus` and `Worker` set it from theirs): a call with no answer by
then (a connection that went silent behind a proxy, a lock held for ever) is abandoned and
raises `DatabaseError`. psycopg asks the server to cancel the statement and waits up to 5 s for
that; a connection that does not answer is then closed, so the pool never gets it back. Calls
on the caller's own connection have no deadline: that connection and its transaction are the
caller's.

Always pass the statement name as a string literal, second positional argument: a test reads
these calls to check that every name used exists.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, overload

import psycopg
from psycopg import AsyncConnection, AsyncRawCursor
from psycopg.rows import AsyncRowFactory, dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from commandbus import _sql
from commandbus._dsn import DEFAULT_CALL_TIMEOUT
from commandbus._errors import map_psycopg_error, map_queue_error
from commandbus.exceptions import DatabaseError

#: Where a statement runs: the caller's connection (and transaction), or a pool.
Target = AsyncConnection[Any] | AsyncConnectionPool[Any]
TupleRow = tuple[Any, ...]
DictRow = dict[str, Any]

R = TypeVar("R")
T = TypeVar("T")

#: Deadline of a library call on a pool that no `CommandBus` or `Worker` configured (seconds).
DEFAULT_POOL_DEADLINE = 3 * DEFAULT_CALL_TIMEOUT
_deadlines: weakref.WeakKeyDictionary[AsyncConnectionPool[Any], float] = weakref.WeakKeyDictionary()


def set_pool_deadline(pool: AsyncConnectionPool[Any], seconds: float) -> None:
    """The deadline of the library's calls on `pool` from now on (the last one set wins)."""
    _deadlines[pool] = seconds


def pool_deadline(pool: AsyncConnectionPool[Any]) -> float:
    """The deadline, in seconds, of one library call (or transaction) on `pool`."""
    return _deadlines.get(pool, DEFAULT_POOL_DEADLINE)


@asynccontextmanager
async def bounded(pool: AsyncConnectionPool[Any]) -> AsyncIterator[None]:
    """Runs the block within `pool_deadline(pool)`: a block still waiting then (for a
    connection, or for an answer on one) is cancelled and `DatabaseError` raised, with the
    `TimeoutError` as its cause. For the library's own transactions on a pool connection."""
    seconds = pool_deadline(pool)
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise DatabaseError(
            f"no answer from the database within {seconds:.1f} s; call abandoned"
        ) from exc


async def _run(
    target: Target,
    query: str,
    params: Sequence[Any],
    row_factory: AsyncRowFactory[R],
    use: Callable[[AsyncRawCursor[R]], Awaitable[T]],
    domain: str | None,
    queue: str | None,
) -> T:
    # No parameters: None keeps psycopg on the simple protocol (statements like LISTEN).
    args = list(params) or None
    try:
        if isinstance(target, AsyncConnectionPool):
            # The commit at the end of the block is inside the try: its error is mapped too.
            async with (
                bounded(target),
                target.connection() as conn,
                AsyncRawCursor(conn, row_factory=row_factory) as cur,
            ):
                await cur.execute(query, args)
                return await use(cur)
        async with AsyncRawCursor(target, row_factory=row_factory) as cur:
            await cur.execute(query, args)
            return await use(cur)
    except psycopg.Error as err:
        if queue is not None:
            raise map_queue_error(err, queue) from err
        raise map_psycopg_error(err, domain) from err


async def _all(cur: AsyncRawCursor[R]) -> list[R]:
    # A statement without a result (an UPDATE without RETURNING) has no rows to fetch.
    return await cur.fetchall() if cur.description is not None else []


async def _one(cur: AsyncRawCursor[R]) -> R | None:
    return await cur.fetchone() if cur.description is not None else None


async def _rowcount(cur: AsyncRawCursor[Any]) -> int:
    return cur.rowcount


@overload
async def fetch_all(
    conn: Target,
    name: str,
    *params: Any,
    rows: type[TupleRow] = ...,
    domain: str | None = None,
    queue: str | None = None,
) -> list[TupleRow]: ...


@overload
async def fetch_all(
    conn: Target,
    name: str,
    *params: Any,
    rows: type[DictRow],
    domain: str | None = None,
    queue: str | None = None,
) -> list[DictRow]: ...


async def fetch_all(
    conn: Target,
    name: str,
    *params: Any,
    rows: type[TupleRow] | type[DictRow] = tuple,
    domain: str | None = None,
    queue: str | None = None,
) -> list[TupleRow] | list[DictRow]:
    """Run statement `name`; return all its rows (none for a statement without a result),
    as tuples or, with `rows=dict`, as dicts by column name.

    `domain` is named by the exceptions that carry one (DuplicateCommandError...); `queue`
    names the PGMQ queue of the statement, so a missing queue table is reported by name.
    """
    if rows is dict:
        return await _run(conn, _sql.statement(name), params, dict_row, _all, domain, queue)
    return await _run(conn, _sql.statement(name), params, tuple_row, _all, domain, queue)


@overload
async def fetch_one(
    conn: Target,
    name: str,
    *params: Any,
    rows: type[TupleRow] = ...,
    domain: str | None = None,
    queue: str | None = None,
) -> TupleRow | None: ...


@overload
async def fetch_one(
    conn: Target,
    name: str,
    *params: Any,
    rows: type[DictRow],
    domain: str | None = None,
    queue: str | None = None,
) -> DictRow | None: ...


async def fetch_one(
    conn: Target,
    name: str,
    *params: Any,
    rows: type[TupleRow] | type[DictRow] = tuple,
    domain: str | None = None,
    queue: str | None = None,
) -> TupleRow | DictRow | None:
    """Run statement `name`; return its first row (a tuple, or a dict with `rows=dict`), or
    None when it has none. `domain` and `queue` as for `fetch_all`."""
    if rows is dict:
        return await _run(conn, _sql.statement(name), params, dict_row, _one, domain, queue)
    return await _run(conn, _sql.statement(name), params, tuple_row, _one, domain, queue)


async def fetch_value(
    conn: Target,
    name: str,
    *params: Any,
    domain: str | None = None,
    queue: str | None = None,
) -> Any:
    """Run statement `name`; return the first column of its first row, or None when it has
    no row. `domain` and `queue` as for `fetch_all`."""
    row = await _run(conn, _sql.statement(name), params, tuple_row, _one, domain, queue)
    return None if row is None else row[0]


async def execute(
    conn: Target,
    name: str,
    *params: Any,
    domain: str | None = None,
    queue: str | None = None,
) -> int:
    """Run statement `name`; return its rowcount (rows changed, or returned by a SELECT).
    `domain` and `queue` as for `fetch_all`."""
    return await _run(conn, _sql.statement(name), params, tuple_row, _rowcount, domain, queue)


async def fetch_all_text(conn: Target, query: str, *params: Any) -> list[TupleRow]:
    """Run SQL that lives outside `sql/statements/` (the demo's own queries in `demo.sql`);
    return all its rows as tuples. Errors are mapped as for `fetch_all`."""
    return await _run(conn, query, params, tuple_row, _all, None, None)


__all__ = [
    "DEFAULT_POOL_DEADLINE",
    "DictRow",
    "Target",
    "TupleRow",
    "bounded",
    "execute",
    "fetch_all",
    "fetch_all_text",
    "fetch_one",
    "fetch_value",
    "pool_deadline",
    "set_pool_deadline",
]
