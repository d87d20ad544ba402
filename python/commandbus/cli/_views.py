"""What the operator's commands share: their common options, finding a command's domain, and
the views of a command, an audit trail and a list of commands."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import typer
from psycopg_pool import AsyncConnectionPool

from commandbus.cli._common import (
    CliError,
    check_domain,
    open_pool,
    print_fields,
    print_table,
)
from commandbus.exceptions import CommandNotFoundError
from commandbus.models import BatchStatus, CommandMetadata, CommandStatus
from commandbus.ops.troubleshooting import TroubleshootingQueue

DomainOption = Annotated[str | None, typer.Option("--domain", help="Only this domain.")]
RequiredDomain = Annotated[str, typer.Option("--domain", help="The domain.")]
TypeOption = Annotated[str | None, typer.Option("--type", help="Only this command type.")]
LimitOption = Annotated[int, typer.Option("--limit", min=1, max=10_000, help="Most rows shown.")]


def connect(dsn: str | None) -> Any:
    return open_pool(dsn)


async def domain_of(pool: AsyncConnectionPool[Any], command_id: UUID, domain: str | None) -> str:
    if domain is not None:
        return await check_domain(pool, domain)
    try:
        return await TroubleshootingQueue(pool).get_command_domain(command_id)
    except CommandNotFoundError:
        raise CliError(f"no command {command_id} in any domain") from None


def print_command(meta: CommandMetadata) -> None:
    print_fields(
        f"command {meta.command_id}",
        [
            ("domain", meta.domain),
            ("type", meta.command_type),
            ("status", meta.status),
            ("attempts", f"{meta.attempts}/{meta.max_attempts}"),
            ("msg_id", meta.msg_id),
            ("correlation_id", meta.correlation_id),
            ("reply_to", meta.reply_to),
            ("batch_id", meta.batch_id),
            (
                "last error",
                " ".join(
                    x
                    for x in (meta.last_error_type, meta.last_error_code, meta.last_error_msg)
                    if x
                ),
            ),
            ("result", meta.result),
            ("created", meta.created_at),
            ("updated", meta.updated_at),
        ],
    )


def print_audit(events: list[Any]) -> None:
    print_table(
        "audit trail",
        ["time", "event", "details"],
        ([e.timestamp, e.event_type, e.details] for e in events),
        empty="no audit events",
    )


def batch_status_option(status: str | None) -> BatchStatus | None:
    if status is None:
        return None
    try:
        return BatchStatus(status.upper())
    except ValueError:
        names = ", ".join(s.value for s in BatchStatus)
        raise CliError(f"invalid --status {status!r}: one of {names}") from None


def command_status_option(status: str | None) -> CommandStatus | None:
    if status is None:
        return None
    try:
        return CommandStatus(status.upper())
    except ValueError:
        names = ", ".join(s.value for s in CommandStatus)
        raise CliError(f"invalid --status {status!r}: one of {names}") from None


def print_commands(title: str, cmds: list[CommandMetadata]) -> None:
    print_table(
        title,
        ["command_id", "domain", "type", "status", "tries", "error", "updated"],
        (
            [
                c.command_id,
                c.domain,
                c.command_type,
                c.status,
                f"{c.attempts}/{c.max_attempts}",
                c.last_error_code,
                c.updated_at,
            ]
            for c in cmds
        ),
        empty="no commands",
    )
