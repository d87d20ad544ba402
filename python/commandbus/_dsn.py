"""Turns the psycopg pool's conninfo into the `postgresql://` URL the Rust engine (sqlx) takes."""

from __future__ import annotations

import inspect
import re
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

# password=... in a key=value conninfo (quoted or not) and in a URL's query string.
_KV_PASSWORD_RE = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
_QUERY_PASSWORD_RE = re.compile(r"((?:^|&)password=)[^&]*")
# user:password@ in a URL that urlsplit cannot parse
_URL_PASSWORD_RE = re.compile(r"(://[^:/@]*:)[^@]*@")

# libpq keywords sqlx understands as URL query parameters.
_PASSTHROUGH = ("sslmode", "sslrootcert", "sslcert", "sslkey", "options", "application_name")


def parse_conninfo(conninfo: str) -> dict[str, Any]:
    """psycopg's `conninfo_to_dict`, whose error on a malformed DSN quotes the whole DSN,
    password included: here it is a ValidationError showing the DSN without its password.

    Raises:
        ValidationError: field `dsn`, when the DSN cannot be parsed.
    """
    from commandbus.exceptions import ValidationError

    try:
        return conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        shown = redact_dsn(conninfo)
        reason = str(exc).replace(conninfo, shown).strip()
        raise ValidationError("dsn", shown, f"cannot be parsed: {reason}") from None


def native_dsn(conninfo: str) -> str:
    """Return a URL for sqlx equivalent to a libpq conninfo string or URI.

    Unix-socket hosts (a path) go in the `host` query parameter, as sqlx expects.
    """
    params = {k: str(v) for k, v in parse_conninfo(conninfo).items() if v is not None}
    user = params.get("user", "")
    password = params.get("password")
    host = params.get("host", "")
    port = params.get("port")
    dbname = params.get("dbname", "")
    query: dict[str, str] = {k: params[k] for k in _PASSTHROUGH if k in params}

    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    if auth:
        auth += "@"
    netloc = ""
    if host.startswith("/"):
        # A URL cannot have a user without a host: everything goes in the query.
        query["host"] = host
        if port:
            query["port"] = port
        if user:
            query["user"] = user
        if password is not None:
            query["password"] = password
        auth = ""
    elif host:
        netloc = f"[{host}]" if ":" in host else host
        if port:
            netloc += f":{port}"
    url = f"postgresql://{auth}{netloc}/{quote(dbname, safe='')}"
    if query:
        url += "?" + urlencode(query)
    return url


#: Default deadline in seconds of one database call of the Rust engine (`Worker`, `CommandBus`).
DEFAULT_CALL_TIMEOUT = 10.0

#: libpq parameters for the connections the library opens itself with psycopg (the batch
#: listener, the pools it creates): TCP keepalives (probes after 15 s idle, every 5 s, 3 of
#: them) and `tcp_user_timeout` (30 s of unacknowledged data) end a connection whose peer
#: vanished at the network level; `connect_timeout` bounds the connect. The Rust engine sets
#: the same on its sockets (rust/vendor/sqlx-core/RCMD-PATCH.md). Values the conninfo sets
#: itself win.
KEEPALIVE_PARAMS: dict[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "15",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
    "connect_timeout": "10",
}


def keepalive_kwargs(conninfo: str) -> dict[str, str]:
    """The `KEEPALIVE_PARAMS` a conninfo does not set itself, as connection kwargs."""
    given = conninfo_to_dict(conninfo)
    return {k: v for k, v in KEEPALIVE_PARAMS.items() if k not in given}


def validate_call_timeout(value: object) -> float:
    """`call_timeout` as a float, or ValidationError naming it: a number of seconds > 0."""
    from commandbus.exceptions import ValidationError

    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= 1_000_000  # also rejects NaN
    ):
        raise ValidationError("call_timeout", value, "must be a number of seconds > 0")
    return float(value)


def redact_dsn(dsn: str) -> str:
    """`dsn` (a URL or a key=value conninfo) with any password shown as `***`, for messages."""
    if "://" not in dsn:
        return _KV_PASSWORD_RE.sub(r"\1***", dsn)
    try:
        parts = urlsplit(dsn)
    except ValueError:  # e.g. an unclosed [ of an IPv6 host
        return _QUERY_PASSWORD_RE.sub(r"\1***", _URL_PASSWORD_RE.sub(r"\1***@", dsn))
    netloc = parts.netloc
    if "@" in netloc:
        auth, _, hosts = netloc.rpartition("@")
        if ":" in auth:
            auth = auth.split(":", 1)[0] + ":***"
        netloc = f"{auth}@{hosts}"
    query = _QUERY_PASSWORD_RE.sub(r"\1***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def pool_conninfo(pool: object) -> str:
    """The conninfo of a psycopg pool (a string, or psycopg_pool's sync callable form)."""
    from commandbus.exceptions import ValidationError

    conninfo = getattr(pool, "conninfo", None)
    if callable(conninfo):
        conninfo = conninfo()
        if inspect.isawaitable(conninfo):
            if inspect.iscoroutine(conninfo):
                conninfo.close()
            raise ValidationError(
                "pool", pool, "a conninfo given as an async callable is not supported"
            )
    if not isinstance(conninfo, str):
        raise ValidationError("pool", pool, "must be a psycopg pool with a conninfo string")
    return conninfo
