"""Logging: every logger of the library is under `commandbus` (`getLogger(__name__)`), and
the library prints nothing (only the command-line entry points write to stdout/stderr)."""

from __future__ import annotations

import ast
from pathlib import Path

import commandbus

# the package as imported: the source tree, or the installed wheel (scripts/test-wheel)
PACKAGE = Path(commandbus.__file__).resolve().parent
# command-line output is the point of these: `python -m commandbus` (the `rcmd` CLI),
# `python -m commandbus.console` and `python -m commandbus.e2e` (the demo worker's command line)
CLI = {"__main__.py", "console/__main__.py", "e2e.py"}
CLI_DIRS = {"cli"}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _is_cli(path: Path) -> bool:
    rel = path.relative_to(PACKAGE)
    return rel.as_posix() in CLI or rel.parts[0] in CLI_DIRS


def test_no_print_outside_the_command_line() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path, tree in _modules()
        if not _is_cli(path)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    assert found == []


def test_every_logger_is_named_after_its_module() -> None:
    seen, wrong = 0, []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
            ):
                seen += 1
                args = node.args
                if not (
                    len(args) == 1 and isinstance(args[0], ast.Name) and args[0].id == "__name__"
                ):
                    wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert seen > 10  # the check sees the loggers
    assert wrong == []
