"""The SQL text of the protocol, read from the native module (embedded from `sql/` at build
time), so the psycopg path runs exactly the statements the Rust engine runs.

For development only, `RCMD_SQL_DIR=/path/to/sql` makes the Python side read `statements/` and
`migrations/` from a source tree instead (the Rust engine keeps what it was built with).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from commandbus import _native


def _dev_dir() -> Path | None:
    value = os.environ.get("RCMD_SQL_DIR")
    return Path(value) if value else None


@cache
def _statements() -> dict[str, str]:
    dev = _dev_dir()
    if dev is not None:
        return {p.stem: p.read_text() for p in sorted((dev / "statements").glob("*.sql"))}
    return dict(_native.statements())


def statement(name: str) -> str:
    """Return the named statement of `sql/statements/` (uses `$1` placeholders: run it with
    psycopg's `RawCursor` / `AsyncRawCursor`)."""
    try:
        return _statements()[name]
    except KeyError:
        raise KeyError(f"no SQL statement named {name!r}") from None


def migrations() -> list[tuple[int, str, str]]:
    """The numbered migrations of `sql/migrations/` as (version, name, sql)."""
    dev = _dev_dir()
    if dev is not None:
        found = []
        for p in sorted((dev / "migrations").glob("V*__*.sql")):
            version, name = p.stem[1:].split("__", 1)
            found.append((int(version), name, p.read_text()))
        return found
    return list(_native.migrations())


def command_queue(domain: str) -> str:
    """The PGMQ queue of a domain's commands (the predecessor's naming)."""
    return f"{domain}__commands"
