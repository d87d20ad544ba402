"""The SQL text of the protocol, read from the native module (embedded from `sql/` at build
time), so the psycopg path runs exactly the statements the Rust engine runs.

For development only, `RCMD_SQL_DIR=/path/to/sql` makes the Python side read `statements/` and
`migrations/` from a source tree instead (the Rust engine keeps what it was built with).

A statements file (`sql/statements/<area>.sql`) holds named blocks:

    -- name: get_command
    -- The command row of one domain's command.
    -- $1 domain TEXT, $2 command_id UUID
    SELECT ...

The comment lines right after `-- name:` are the header (what the statement does, its
parameters); the rest, up to the next `-- name:` line, is the statement's text. Comment and blank
lines before the first block describe the file. `parse_statements` reads this format (as
`rust/core/build.rs` does for the embedded catalog).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from commandbus import _native

_NAME_LINE = "-- name:"
_VALID_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Statement:
    """One named block of a statements file."""

    name: str
    header: tuple[str, ...]  # the comment lines after `-- name:`
    text: str  # the statement, header left out, surrounding whitespace trimmed


def parse_statements(source: str, origin: str = "<sql>") -> list[Statement]:
    """The named blocks of a statements file, in order. Raises ValueError on text outside a
    named block, an invalid name, a block without text, or a name defined twice."""
    blocks: list[tuple[str, list[str], list[str]]] = []
    in_header = False
    for number, line in enumerate(source.splitlines(), start=1):
        if line.startswith(_NAME_LINE):
            name = line[len(_NAME_LINE) :].strip()
            if not _VALID_NAME.fullmatch(name):
                raise ValueError(f"{origin}:{number}: invalid statement name {name!r}")
            blocks.append((name, [], []))
            in_header = True
        elif not blocks:
            if line.strip() and not line.lstrip().startswith("--"):
                raise ValueError(f"{origin}:{number}: SQL outside a `-- name:` block")
        elif in_header and line.startswith("--"):
            blocks[-1][1].append(line)
        else:
            in_header = False
            blocks[-1][2].append(line)
    found: list[Statement] = []
    for name, header, body in blocks:
        text = "\n".join(body).strip()
        if not text:
            raise ValueError(f"{origin}: statement {name} has no text")
        if any(s.name == name for s in found):
            raise ValueError(f"{origin}: statement {name} is defined twice")
        found.append(Statement(name, tuple(header), text))
    return found


def read_statements(directory: Path) -> dict[str, Statement]:
    """The statements of every `*.sql` file of a directory by name (a name defined in two
    files raises ValueError)."""
    found: dict[str, Statement] = {}
    for path in sorted(directory.glob("*.sql")):
        for stmt in parse_statements(path.read_text(), str(path)):
            if stmt.name in found:
                raise ValueError(f"{path}: statement {stmt.name} is defined twice")
            found[stmt.name] = stmt
    return found


def _dev_dir() -> Path | None:
    value = os.environ.get("RCMD_SQL_DIR")
    return Path(value) if value else None


@cache
def _statements() -> dict[str, str]:
    dev = _dev_dir()
    if dev is not None:
        return {name: s.text for name, s in read_statements(dev / "statements").items()}
    return dict(_native.statements())


def statement(name: str) -> str:
    """Return the named statement of `sql/statements/*.sql` (uses `$1` placeholders: run it with
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
