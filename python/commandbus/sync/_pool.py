"""From the caller's sync `ConnectionPool` to the async pool the async machinery takes."""

from __future__ import annotations

from typing import Any

from psycopg import pq
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from commandbus._dsn import keepalive_kwargs, pool_conninfo
from commandbus.exceptions import ValidationError

_LIBPQ_KEYWORDS = frozenset(
    opt.keyword.decode() for opt in pq.Conninfo.get_defaults() if opt.keyword is not None
)


def sync_pool_settings(pool: object) -> tuple[str, dict[str, Any]]:
    """(conninfo, other connection kwargs) of a psycopg `ConnectionPool`: its `kwargs` that
    are libpq keywords (a password given there, say) are merged into the conninfo, so the
    Rust engine connects as the pool does; the rest (`autocommit`...) stay kwargs."""
    if isinstance(pool, AsyncConnectionPool):
        raise ValidationError("pool", pool, "the sync API takes a psycopg_pool.ConnectionPool")
    conninfo = pool_conninfo(pool)
    kwargs = dict(getattr(pool, "kwargs", None) or {})
    libpq = {k: v for k, v in kwargs.items() if k in _LIBPQ_KEYWORDS and v is not None}
    other = {k: v for k, v in kwargs.items() if k not in libpq}
    if libpq:
        conninfo = make_conninfo(conninfo, **libpq)
    return conninfo, other


def async_twin(
    conninfo: str, kwargs: dict[str, Any], max_size: int, name: str
) -> AsyncConnectionPool[Any]:
    """An unopened async pool on the same server (open and close it on the loop it serves), its
    connections with TCP keepalives (`KEEPALIVE_PARAMS`, unless the conninfo sets them)."""
    return AsyncConnectionPool(
        conninfo,
        kwargs={**keepalive_kwargs(conninfo), **kwargs},
        min_size=1,
        max_size=max(1, max_size),
        open=False,
        name=name,
    )


__all__ = ["async_twin", "sync_pool_settings"]
