"""The `rcmd` Typer application: its commands, and the one place where errors become one line
on stderr and an exit code (never a traceback for bad input or an unusable database)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import psycopg
import typer
from typer.core import TyperGroup

from commandbus.cli._common import CliError, first_line, stderr
from commandbus.exceptions import CommandBusError

logger = logging.getLogger(__name__)


def _fail(message: str, code: int) -> typer.Exit:
    stderr.print(f"error: {message}", markup=False)
    return typer.Exit(code)


class RcmdGroup(TyperGroup):
    """The top-level group: every subcommand runs inside its `invoke`, so this is where our
    errors are turned into `error: ...` lines and exit codes."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (recent typer vendors its click)
        try:
            return super().invoke(ctx)
        except CliError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except CommandBusError as exc:
            raise _fail(first_line(exc), 1) from None
        except psycopg.Error as exc:
            raise _fail(f"database error: {first_line(exc)}", 1) from None
        except KeyboardInterrupt:
            stderr.print("\ninterrupted")
            raise typer.Exit(130) from None


app = typer.Typer(
    name="rcmd",
    cls=RcmdGroup,
    help="rcmd: reliable commands over PostgreSQL + PGMQ. Set up the database, run workers, "
    "send commands, inspect and repair the troubleshooting queue, watch the bus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    from commandbus.cli import admin, ops, send, worker

    admin.register(app)
    send.register(app)
    worker.register(app)
    ops.register(app)


_register()


def main(argv: list[str] | None = None) -> int:
    """The `rcmd` entry point (also `python -m commandbus`); returns the exit code."""
    try:
        app(args=argv, prog_name="rcmd", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0
