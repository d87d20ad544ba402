"""The statement catalog of `sql/statements/` against the code that uses it, both ways: a
statement no code uses fails, and so does a name the code looks up that has no statement.

Uses are found without running anything:
  * Python (`python/commandbus/`, with `ast`): the string-literal argument of `statement("x")` /
    `_sql.statement("x")`, and the second positional argument of `_db.fetch_all(conn, "x", ...)`,
    `_db.fetch_one`, `_db.fetch_value`, `_db.execute` (`from commandbus import _db`), and the
    same calls of the sync twin `_db_sync` (`_db_sync.fetch_all(conn, "x", ...)`). Those
    literals must name a statement, and a `_db.<fn>` call whose name is not a literal fails (it
    could name anything). Local helpers that take a name (`_one(conn, "x")`, `_fetch(...)`)
    pass it through to `statement(name)`: any call with a string literal argument equal to a
    statement's name counts as a use of it.
  * Rust (`rust/`, by regular expression): `statement("x")` / `sql::statement("x")`.

Every block also needs a header: a description, and its parameters (`$1 name TYPE`, each
placeholder of the text, `{queue_table}` for a template) or "No parameters.".
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from commandbus import _native, _sql
from commandbus._sql import Statement

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "commandbus"
DB_FUNCTIONS = {"fetch_all", "fetch_one", "fetch_value", "execute"}
DB_MODULES = {"_db", "_db_sync"}
RUST_USE = re.compile(r"\bstatement\(\s*\"([^\"]*)\"\s*\)")


def _catalog() -> dict[str, Statement]:
    return _sql.read_statements(ROOT / "sql" / "statements")


def _python_files() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


def _python_uses(names: set[str]) -> tuple[set[str], dict[str, str], list[str]]:
    """(names used, {name looked up strictly: where}, problems)."""
    used: set[str] = set()
    strict: dict[str, str] = {}
    problems: list[str] = []
    for path, tree in _python_files():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in {
                f"commandbus.{m}" for m in DB_MODULES
            }:
                problems.append(
                    f"{_where(path, node)}: import the module "
                    f"(`from commandbus import {node.module.rsplit('.', 1)[1]}`)"
                )
            if not isinstance(node, ast.Call):
                continue
            args = [*node.args, *(k.value for k in node.keywords)]
            used |= {v for v in map(_literal, args) if v in names}
            func = node.func
            if (isinstance(func, ast.Name) and func.id == "statement") or (
                isinstance(func, ast.Attribute)
                and func.attr == "statement"
                and isinstance(func.value, ast.Name)
                and func.value.id == "_sql"
            ):
                value = _literal(node.args[0]) if node.args else None
                if value is not None:
                    strict[value] = _where(path, node)
            elif (
                isinstance(func, ast.Attribute)
                and func.attr in DB_FUNCTIONS
                and isinstance(func.value, ast.Name)
                and func.value.id in DB_MODULES
            ):
                value = _literal(node.args[1]) if len(node.args) > 1 else None
                if value is None:
                    problems.append(
                        f"{_where(path, node)}: {func.value.id}.{func.attr} without a literal name"
                    )
                else:
                    strict[value] = _where(path, node)
    return used, strict, problems


def _rust_uses() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted((ROOT / "rust").rglob("*.rs")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for name in RUST_USE.findall(line):
                found[name] = f"{path.relative_to(ROOT)}:{number}"
    return found


def _header_problems(stmt: Statement) -> list[str]:
    header = "\n".join(stmt.header)
    problems = []
    if not stmt.header or re.match(r"--\s*(\$\d|\{|No parameters)", stmt.header[0]):
        problems.append(f"{stmt.name}: no description")
    placeholders = sorted({int(n) for n in re.findall(r"\$(\d+)", stmt.text)})
    if placeholders:
        missing = [n for n in placeholders if not re.search(rf"\${n} \w", header)]
        if missing:
            problems.append(f"{stmt.name}: parameters {missing} not documented")
    elif "No parameters." not in header:
        problems.append(f"{stmt.name}: no parameter line (say 'No parameters.')")
    if "{queue_table}" in stmt.text and "{queue_table}" not in header:
        problems.append(f"{stmt.name}: template {{queue_table}} not documented")
    return problems


def test_every_statement_is_used_and_every_name_used_has_a_statement() -> None:
    catalog = _catalog()
    names = set(catalog)
    used, strict, problems = _python_uses(names)
    rust = _rust_uses()
    assert not problems
    missing = {n: w for n, w in {**strict, **rust}.items() if n not in names}
    assert missing == {}, "names looked up that have no statement"
    unused = names - used - set(rust)
    assert unused == set(), "statements no code of the library uses"


def test_every_block_has_a_header_naming_its_parameters() -> None:
    problems = [p for stmt in _catalog().values() for p in _header_problems(stmt)]
    assert problems == []


def test_the_embedded_catalog_is_what_the_files_say() -> None:
    """The build (rust/core/build.rs) and `_sql.parse_statements` read the files alike."""
    files = {name: stmt.text for name, stmt in _catalog().items()}
    assert dict(_native.statements()) == files


@pytest.mark.parametrize(
    ("sql_file", "user", "helper"),
    [
        (PACKAGE / "demo.sql", PACKAGE / "cli" / "demo.py", "_query"),
        (ROOT / "benches" / "sql" / "soak.sql", ROOT / "benches" / "soak.py", "_count"),
        (ROOT / "benches" / "sql" / "console.sql", ROOT / "benches" / "console.py", "_query"),
    ],
)
def test_demo_and_benchmark_queries_live_with_their_code(
    sql_file: Path, user: Path, helper: str
) -> None:
    """The demo's and the soak benchmark's own queries: each used by its code, each name its
    code asks for defined, each with a header; none of them in the library's catalog."""
    statements = {s.name: s for s in _sql.parse_statements(sql_file.read_text(), str(sql_file))}
    asked = {
        value
        for node in ast.walk(ast.parse(user.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == helper
        and len(node.args) > 1
        and (value := _literal(node.args[1])) is not None
    }
    assert asked == set(statements)
    assert [p for s in statements.values() for p in _header_problems(s)] == []
    assert not set(statements) & set(_catalog())


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("SELECT 1\n-- name: a\n-- No parameters.\nSELECT 1\n", "outside"),
        ("-- name: a\n-- No parameters.\n", "no text"),
        ("-- name: a\n-- x\nSELECT 1\n-- name: a\n-- x\nSELECT 2\n", "twice"),
        ("-- name: A-b\nSELECT 1\n", "invalid"),
    ],
)
def test_the_parser_refuses_malformed_files(source: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        _sql.parse_statements(source)


def test_the_parser_keeps_dollar_quoted_bodies_and_templates() -> None:
    source = (
        "-- file header\n\n"
        "-- name: a\n-- Does a.\n-- $1 n INT, {queue_table} a table\n"
        "DO $$\nBEGIN\n    -- a comment of the body\n    PERFORM 1;\nEND $$   \n\n"
        "-- name: b\n-- Does b.\n-- No parameters.\nSELECT 1 FROM pgmq.{queue_table}\n"
    )
    a, b = _sql.parse_statements(source)
    assert (a.name, a.header) == ("a", ("-- Does a.", "-- $1 n INT, {queue_table} a table"))
    assert a.text == "DO $$\nBEGIN\n    -- a comment of the body\n    PERFORM 1;\nEND $$"
    assert (b.name, b.text) == ("b", "SELECT 1 FROM pgmq.{queue_table}")
