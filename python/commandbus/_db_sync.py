"""The sync twin of `_db` for the sync API's transactional send: runs a named statement of
`sql/statements/` on the caller's psycopg (sync) `Connection`, inside the caller's
transaction. Errors are mapped exactly as in `_db` (`commandbus._errors`), the driver error as
the `__cause__`.

Always pass the statement name as a string literal, second positional argument: the SQL
catalog test (`tests/unit/test_sql_catalog.py`) reads these calls as it reads `_db`'s.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import RawCursor

from commandbus import _sql
from commandbus._errors import map_psycopg_error, map_queue_error

TupleRow = tuple[Any, ...]


def fetch_all(
    conn: psycopg.Connection[Any],
    name: str,
    *params: Any,
    domain: str | None = None,
    queue: str | None = None,
) -> list[TupleRow]:
    """Run statement `name` on `conn` (its transaction); return all its rows as tuples (none
    for a statement without a result). `domain` and `queue` as for `_db.fetch_all`."""
    args = list(params) or None
    try:
        with RawCursor(conn) as cur:
            cur.execute(_sql.statement(name), args)
            return list(cur.fetchall()) if cur.description is not None else []
    except psycopg.Error as err:
        if queue is not None:
            raise map_queue_error(err, queue) from err
        raise map_psycopg_error(err, domain) from err


__all__ = ["fetch_all"]
