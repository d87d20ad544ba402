"""`rcmd send` and `rcmd send-bulk`: commands from the command line."""

from __future__ import annotations

import time
from typing import Annotated, Any
from uuid import UUID, uuid4

import typer
from psycopg_pool import AsyncConnectionPool
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from commandbus.bus import CommandBus
from commandbus.cli._common import (
    DsnOption,
    JsonOption,
    check_domain,
    open_pool,
    parse_json_object,
    parse_uuid,
    print_json,
    run,
    stderr,
    stdout,
)
from commandbus.models import SendRequest

DataOption = Annotated[str, typer.Option("--data", "-d", help="The command's data: a JSON object.")]
NewDomainOption = Annotated[
    bool,
    typer.Option(
        "--new-domain",
        help="Allow a domain that has no queue yet (the send creates it). Without it an "
        "unknown domain is refused: a typo would queue commands no worker reads.",
    ),
]
MaxAttemptsOption = Annotated[
    int | None,
    typer.Option("--max-attempts", min=1, help="Attempts before the TSQ (default: the worker's)."),
]


async def _domain_ok(pool: AsyncConnectionPool[Any], domain: str, new_domain: bool) -> None:
    from commandbus._validation import validate_domain

    validate_domain(domain)
    if not new_domain:
        await check_domain(pool, domain)


def send(
    domain: Annotated[str, typer.Argument(help="The command's domain.")],
    command_type: Annotated[str, typer.Argument(metavar="TYPE", help="The command type.")],
    data: DataOption = "{}",
    command_id: Annotated[
        str | None, typer.Option("--id", help="The command id (default: a new UUID).")
    ] = None,
    correlation_id: Annotated[
        str | None, typer.Option("--correlation-id", help="Correlation id (UUID).")
    ] = None,
    reply_to: Annotated[str | None, typer.Option("--reply-to", help="Queue for the reply.")] = None,
    max_attempts: MaxAttemptsOption = None,
    new_domain: NewDomainOption = False,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send one command; prints its command id and queue message id."""
    payload = parse_json_object(data, "--data")
    cid = uuid4() if command_id is None else parse_uuid(command_id, "--id")
    corr: UUID | None = (
        None if correlation_id is None else parse_uuid(correlation_id, "--correlation-id")
    )

    async def go() -> tuple[UUID, int]:
        async with open_pool(dsn) as pool:
            await _domain_ok(pool, domain, new_domain)
            bus = CommandBus(pool)
            try:
                result = await bus.send(
                    domain, command_type, cid, payload, corr, reply_to, max_attempts
                )
            finally:
                await bus.close()
            return result.command_id, result.msg_id

    sent_id, msg_id = run(go())
    if as_json:
        print_json({"domain": domain, "command_id": sent_id, "msg_id": msg_id})
    else:
        stdout.print(f"sent {domain}.{command_type} {sent_id} (msg_id {msg_id})", markup=False)


def send_bulk(
    domain: Annotated[str, typer.Argument(help="The commands' domain.")],
    command_type: Annotated[str, typer.Argument(metavar="TYPE", help="The command type.")],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many commands.")],
    data: DataOption = "{}",
    max_attempts: MaxAttemptsOption = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, help="Commands per transaction.")
    ] = 1_000,
    new_domain: NewDomainOption = False,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send COUNT commands of one type, all with the same data (new ids), with a progress bar."""
    payload = parse_json_object(data, "--data")

    async def go() -> float:
        async with open_pool(dsn) as pool:
            await _domain_ok(pool, domain, new_domain)
            requests = [
                SendRequest(domain, command_type, uuid4(), payload, max_attempts=max_attempts)
                for _ in range(count)
            ]
            bus = CommandBus(pool)
            progress = Progress(
                TextColumn("sending"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=stderr,
                transient=as_json,
            )
            task = progress.add_task("send", total=count)
            t0 = time.perf_counter()
            try:
                with progress:
                    await bus.send_batch(
                        requests,
                        chunk_size,
                        on_progress=lambda sent, _total: progress.update(task, completed=sent),
                    )
            finally:
                await bus.close()
            return time.perf_counter() - t0

    seconds = run(go())
    rate = count / seconds if seconds > 0 else 0.0
    if as_json:
        print_json(
            {"domain": domain, "sent": count, "seconds": round(seconds, 4), "rate": round(rate, 1)}
        )
    else:
        stdout.print(
            f"sent {count} {domain}.{command_type} commands in {seconds:.2f} s ({rate:.0f}/s)",
            markup=False,
        )


def register(app: typer.Typer) -> None:
    app.command()(send)
    app.command("send-bulk")(send_bulk)
