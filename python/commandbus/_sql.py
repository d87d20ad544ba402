"""The SQL text of the protocol, read from the native module (embedded from `sql/` at build
time), so the psycopg path runs exactly the statements the Rust engine runs."""

from __future__ import annotations

from functools import cache

from commandbus import _native


@cache
def statement(name: str) -> str:
    """Return the named statement of `sql/statements/` (uses `$1` placeholders: run it with
    psycopg's `RawCursor` / `AsyncRawCursor`)."""
    try:
        return dict(_native.statements())[name]
    except KeyError:
        raise KeyError(f"no SQL statement named {name!r}") from None


def migrations() -> list[tuple[int, str, str]]:
    """The numbered migrations of `sql/migrations/` as (version, name, sql)."""
    return list(_native.migrations())


def command_queue(domain: str) -> str:
    """The PGMQ queue of a domain's commands (the predecessor's naming)."""
    return f"{domain}__commands"
