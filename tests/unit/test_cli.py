"""The `rcmd` command line without a database: parsing, loading handlers, help, and bad input
that is refused before any connection (one `error:` line, non-zero exit, no traceback)."""

from __future__ import annotations

import shlex
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from commandbus import ValidationError, get_schema_sql
from commandbus.cli import app
from commandbus.cli._common import CliError, parse_duration, parse_json_object
from commandbus.cli.worker import WorkerOptions, choose_domain, load_registry

CLI_TESTS = Path(__file__).resolve().parents[1] / "cli"
runner = CliRunner()


def _invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), env={"DATABASE_URL": "", **(env or {})}, input=input)


def _one_error_line(result, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 43200),
        ("1d12h", 129600),
        ("90m", 5400),
        ("45s", 45),
        ("2w", 1209600),
        ("15", 15),
        ("0s", 0),
        ("1.5h", 5400),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text, "--older-than") == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "3x", "d", "1d 2h", "-1d", "30 days", "1h30"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(CliError, match="invalid --older-than"):
        parse_duration(text, "--older-than")


def test_json_input_must_be_an_object() -> None:
    assert parse_json_object('{"a": [1]}', "--data") == {"a": [1]}
    with pytest.raises(CliError, match="malformed JSON"):
        parse_json_object("{a", "--data")
    with pytest.raises(CliError, match="expected a JSON object, got list"):
        parse_json_object("[1]", "--data")


def test_help_lists_every_command() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    for name in ("setup", "check", "worker", "send", "send-bulk", "tsq", "commands", "audit",
                 "batches", "stats", "prune", "dev", "demo", "console"):  # fmt: skip
        assert name in result.output, name
    for group, subs in {
        "tsq": ("list", "show", "retry", "cancel", "complete"),
        "commands": ("list", "show"),
        "batches": ("list", "show"),
    }.items():
        out = _invoke(group, "--help").output
        assert all(s in out for s in subs), out


def test_print_sql_needs_no_database() -> None:
    result = _invoke("setup", "--print-sql")
    assert result.exit_code == 0
    assert result.stdout == get_schema_sql()


@pytest.mark.parametrize(
    "args",
    [
        ["check"],
        ["setup"],
        ["send", "d", "T"],
        ["tsq", "list"],
        ["prune", "--older-than", "1d"],
        ["worker", "cli_handlers:registry"],
        ["commands", "list"],
        ["stats"],
    ],
)
def test_no_database_is_one_line(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(CLI_TESTS))
    _one_error_line(_invoke(*args), "no database given: pass --dsn or set DATABASE_URL")


def test_bad_input_is_refused_before_connecting() -> None:
    dsn = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    _one_error_line(_invoke("send", "d", "T", "--data", "{x", env=dsn), "malformed JSON")
    _one_error_line(_invoke("send", "d", "T", "--id", "nope", env=dsn), "not a UUID")
    _one_error_line(_invoke("prune", "--older-than", "soon", env=dsn), "invalid --older-than")
    _one_error_line(_invoke("tsq", "retry", env=dsn), "give one or more command ids, or --all")
    _one_error_line(
        _invoke("tsq", "retry", "--all", "--type", "T", env=dsn), "--type needs --domain"
    )
    _one_error_line(_invoke("tsq", "show", "123", env=dsn), "invalid command id '123'")
    _one_error_line(_invoke("batches", "list", "--domain", "d", "--status", "odd", env=dsn),
                    "invalid --status 'odd'")  # fmt: skip


def test_the_demo_keeps_its_options() -> None:
    """`python -m commandbus demo` as before: --commands, --concurrency, --dsn, --timeout."""
    out = _invoke("demo", "--help").output
    for option in ("--commands", "--concurrency", "--dsn", "--timeout"):
        assert option in out
    result = _invoke("demo", "--commands", "0")
    assert result.exit_code == 2  # a usage error, as argparse gave


def test_console_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "commandbus.console", None)  # the extra is not installed
    result = _invoke("console", "--dsn", "postgresql://x@127.0.0.1:1/x")
    _one_error_line(result, "pip install 'reliable-commands[console]'")
    _one_error_line(_invoke("console"), "pass --dsn, set DATABASE_URL, or use --embedded")


def test_metrics_port_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(CLI_TESTS))
    monkeypatch.setitem(sys.modules, "commandbus.metrics", None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    for processes in ("1", "2"):
        result = _invoke(
            "worker", "cli_handlers:registry", "--metrics-port", "9999", "--processes", processes,
            env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
        )  # fmt: skip
        _one_error_line(result, "pip install 'reliable-commands[metrics]'")


# -- loading handlers -----------------------------------------------------------------------


@pytest.fixture
def handlers_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(CLI_TESTS))


@pytest.mark.usefixtures("handlers_path")
def test_load_a_registry_a_module_or_a_factory() -> None:
    import cli_handlers  # type: ignore[import-not-found]

    assert load_registry("cli_handlers:registry") is cli_handlers.registry
    assert load_registry("cli_handlers:make_registry") is cli_handlers.registry
    from_module = load_registry("cli_handlers")  # the module's @handler functions
    assert sorted(from_module.registered_handlers()) == [("clitest", "Plain"), ("other", "Plain")]


@pytest.mark.usefixtures("handlers_path")
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:registry", "cannot import 'no_such_module_xyz'"),
        ("cli_handlers:nothing", "has no attribute 'nothing'"),
        ("cli_handlers:", "expected MODULE or MODULE:OBJECT"),
        ("json", "holds no handlers"),
        ("cli_handlers:work", "holds no handlers"),
    ],
)
def test_bad_handler_specs(spec: str, message: str) -> None:
    with pytest.raises(CliError, match=message):
        load_registry(spec)


def test_a_module_that_raises_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_handlers_mod.py").write_text("import no_such_dependency_qq\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CliError, match="importing 'broken_handlers_mod' failed"):
        load_registry("broken_handlers_mod:registry")
    (tmp_path / "raising_handlers_mod.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(CliError, match="RuntimeError: boom"):
        load_registry("raising_handlers_mod")


@pytest.mark.usefixtures("handlers_path")
def test_domain_choice() -> None:
    both = load_registry("cli_handlers")
    with pytest.raises(CliError, match="several domains"):
        choose_domain(both, "cli_handlers", None)
    with pytest.raises(CliError, match="unknown domain 'nope'"):
        choose_domain(both, "cli_handlers", "nope")
    assert choose_domain(load_registry("cli_handlers:registry"), "x", None) == "clitest"


def test_children_get_the_dsn_from_the_environment() -> None:
    args = WorkerOptions(domain="d", processes=3, sync=True).child_args("m:r")
    assert "--dsn" not in args  # a password on a command line is visible to every user
    assert args[args.index("--processes") + 1] == "1"
    assert "--sync" in args


def test_console_hands_its_options_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rcmd console` calls `commandbus.console.serve(...)` as contracts.md says (a stand-in
    module records the call; the console's own tests serve real pages)."""
    calls: list[dict[str, object]] = []

    def serve(**kwargs: object) -> None:
        if kwargs["host"] == "0.0.0.0":
            raise ValidationError("host", "0.0.0.0", "needs credentials (RCMD_CONSOLE_TOKEN)")
        calls.append(kwargs)

    monkeypatch.setitem(sys.modules, "commandbus.console", SimpleNamespace(serve=serve))
    dsn = "postgresql://x@127.0.0.1:1/x"
    assert _invoke("console", "--dsn", dsn, "--port", "8123", "--read-only").exit_code == 0
    assert _invoke("console", "--embedded").exit_code == 0
    assert calls == [
        {"dsn": dsn, "embedded": False, "host": "127.0.0.1", "port": 8123, "read_only": True},
        {"dsn": None, "embedded": True, "host": "127.0.0.1", "port": 8000, "read_only": False},
    ]
    _one_error_line(_invoke("console", "--embedded", "--host", "0.0.0.0"), "needs credentials")


def test_the_readme_session_uses_real_commands_and_options() -> None:
    """Every `$ rcmd ...` line of the README names a command that exists, with options it has."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    session = readme.split("## The rcmd CLI", 1)[1].split("```console", 1)[1].split("```", 1)[0]
    lines = [ln[2:].split("  #", 1)[0].rstrip(" &") for ln in session.splitlines()]
    calls = [shlex.split(ln)[1:] for ln in lines if ln.startswith("rcmd ")]
    assert len(calls) >= 15
    root = typer.main.get_command(app)
    for args in calls:
        command: Any = root
        for word in args:
            if word.startswith("-") or not hasattr(command, "commands"):
                break
            assert word in command.commands, args
            command = command.commands[word]
        options = {o for p in command.params for o in p.opts}
        for option in (w.split("=", 1)[0] for w in args if w.startswith("--")):
            assert option in options, (args, option)
