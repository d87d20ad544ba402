"""The operator's commands: `rcmd commands ...`, `audit`, `batches ...`, `stats`, `prune` (and
`tsq ...`, in tsq.py). Each reads or acts through the library's public API (CommandBus,
retention, the Monitor read model)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from commandbus.bus import CommandBus
from commandbus.cli._common import (
    CliError,
    DsnOption,
    JsonOption,
    check_domain,
    parse_datetime,
    parse_duration,
    parse_uuid,
    plain,
    print_fields,
    print_json,
    print_table,
    run,
    stderr,
    stdout,
)
from commandbus.cli._views import (
    DomainOption,
    LimitOption,
    RequiredDomain,
    TypeOption,
    batch_status_option,
    command_status_option,
    connect,
    domain_of,
    print_audit,
    print_command,
    print_commands,
)
from commandbus.models import CommandMetadata

commands_app = typer.Typer(help="Commands: list with filters, show one.", no_args_is_help=True)
batches_app = typer.Typer(help="Batches: list, show one with its commands.", no_args_is_help=True)

# -- commands and audit ---------------------------------------------------------------------


@commands_app.command("show")
def commands_show(
    command_id: Annotated[str, typer.Argument(help="The command id.")],
    domain: DomainOption = None,
    audit: Annotated[bool, typer.Option("--audit", help="Also print its audit trail.")] = False,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one command: status, attempts, last error, result."""
    cid = parse_uuid(command_id, "command id")

    async def go() -> tuple[CommandMetadata, list[Any]]:
        async with connect(dsn) as pool:
            dom = await domain_of(pool, cid, domain)
            bus = CommandBus(pool)
            try:
                meta = await bus.get_command(dom, cid)
                if meta is None:
                    raise CliError(f"no command {cid} in domain {dom!r}")
                events = await bus.get_audit_trail(cid, dom) if audit else []
            finally:
                await bus.close()
            return meta, events

    meta, events = run(go())
    if as_json:
        print_json({"command": meta, **({"audit": events} if audit else {})})
        return
    print_command(meta)
    if audit:
        print_audit(events)


def audit_command(
    command_id: Annotated[str, typer.Argument(help="The command id.")],
    domain: DomainOption = None,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a command's audit trail (every transition, oldest first)."""
    cid = parse_uuid(command_id, "command id")

    async def go() -> list[Any]:
        async with connect(dsn) as pool:
            if domain is not None:
                await check_domain(pool, domain)
            bus = CommandBus(pool)
            try:
                return await bus.get_audit_trail(cid, domain)
            finally:
                await bus.close()

    events = run(go())
    if not events:
        raise CliError(f"no audit events for command {cid}" + (f" in {domain!r}" if domain else ""))
    if as_json:
        print_json(events)
    else:
        print_audit(events)


@commands_app.command("list")
def commands_list(
    domain: DomainOption = None,
    status: Annotated[str | None, typer.Option("--status", help="Only this status.")] = None,
    command_type: TypeOption = None,
    batch: Annotated[
        str | None, typer.Option("--batch", help="Only this batch's commands.")
    ] = None,
    created_after: Annotated[
        str | None,
        typer.Option("--created-after", help="ISO timestamp, or an age: 2h, 7d (= that long ago)."),
    ] = None,
    created_before: Annotated[
        str | None, typer.Option("--created-before", help="ISO timestamp, or an age.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Most rows shown.")] = 50,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="Continue after a previous page (its cursor).")
    ] = None,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """List commands, newest first, with the console's filters; one page at a time (the next
    page's --cursor is printed after the table)."""
    from commandbus.ops.monitor import CommandFilter, Monitor

    flt = CommandFilter(
        domain=domain,
        status=command_status_option(status),
        command_type=command_type,
        batch_id=None if batch is None else parse_uuid(batch, "--batch"),
        created_after=parse_datetime(created_after, "--created-after"),
        created_before=parse_datetime(created_before, "--created-before"),
    )

    async def go() -> Any:
        async with connect(dsn) as pool:
            if domain is not None:
                await check_domain(pool, domain)
            return await Monitor(pool).list_commands(flt, cursor=cursor, limit=limit)

    page = run(go())
    if as_json:
        print_json({"items": page.items, "next_cursor": page.next_cursor})
        return
    print_commands(f"commands ({len(page.items)} shown)", page.items)
    if page.next_cursor:
        stderr.print(f"more: --cursor {page.next_cursor}", markup=False)


# -- batches --------------------------------------------------------------------------------


@batches_app.command("list")
def batches_list(
    domain: RequiredDomain,
    status: Annotated[
        str | None, typer.Option("--status", help="Only batches in this status.")
    ] = None,
    waiting: Annotated[
        bool,
        typer.Option(
            "--waiting-for-operator",
            help="Only batches whose remaining commands all wait in the TSQ.",
        ),
    ] = False,
    limit: LimitOption = 50,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """List a domain's batches, newest first."""
    wanted = batch_status_option(status)

    async def go() -> list[Any]:
        async with connect(dsn) as pool:
            await check_domain(pool, domain)
            bus = CommandBus(pool)
            try:
                return await bus.list_batches(
                    domain,
                    status=wanted,
                    limit=limit,
                    waiting_for_operator=True if waiting else None,
                )
            finally:
                await bus.close()

    batches = run(go())
    if as_json:
        print_json(batches)
        return
    print_table(
        f"batches of {domain}",
        [
            "batch_id",
            "name",
            "status",
            "total",
            "completed",
            "failed",
            "canceled",
            "in TSQ",
            "created",
        ],
        (
            [
                b.batch_id,
                b.name,
                b.status,
                b.total_count,
                b.completed_count,
                b.failed_count,
                b.canceled_count,
                b.in_troubleshooting_count,
                b.created_at,
            ]
            for b in batches
        ),
        empty=f"no batches in {domain}",
    )


@batches_app.command("show")
def batches_show(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    domain: RequiredDomain,
    status: Annotated[
        str | None, typer.Option("--status", help="Only the batch's commands in this status.")
    ] = None,
    limit: LimitOption = 100,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a batch (counters, status) and its commands."""
    bid = parse_uuid(batch_id, "batch id")
    wanted = command_status_option(status)

    async def go() -> tuple[Any, list[CommandMetadata]]:
        async with connect(dsn) as pool:
            await check_domain(pool, domain)
            bus = CommandBus(pool)
            try:
                batch = await bus.get_batch(domain, bid)
                if batch is None:
                    raise CliError(f"no batch {bid} in domain {domain!r}")
                cmds = await bus.list_batch_commands(domain, bid, status=wanted, limit=limit)
            finally:
                await bus.close()
            return batch, cmds

    batch, cmds = run(go())
    if as_json:
        print_json(
            {"batch": batch, "waiting_for_operator": batch.waiting_for_operator, "commands": cmds}
        )
        return
    print_fields(
        f"batch {batch.batch_id}",
        [
            ("domain", batch.domain),
            ("name", batch.name),
            ("type", batch.batch_type),
            ("status", batch.status),
            ("waiting for operator", "yes" if batch.waiting_for_operator else "no"),
            ("total", batch.total_count),
            ("completed", batch.completed_count),
            ("failed", batch.failed_count),
            ("canceled", batch.canceled_count),
            ("in TSQ", batch.in_troubleshooting_count),
            ("created", batch.created_at),
            ("started", batch.started_at),
            ("completed at", batch.completed_at),
        ],
    )
    print_commands(f"commands ({len(cmds)} shown)", cmds)


# -- stats ----------------------------------------------------------------------------------

_STATUSES = ("PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELED")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _count(n: int | None, estimated: bool) -> str:
    if n is None:
        return "?" if estimated else "0"
    return f"~{n}" if estimated else str(n)


def _stats_table(stats: list[tuple[Any, int]]) -> Table:
    table = Table(title="rcmd stats", title_justify="left", show_edge=False, pad_edge=False)
    # short headers: twelve columns fit in 100
    for name in ("domain", "pending", "running", "completed", "failed", "canceled", "tsq",
                 "depth", "oldest", "done/s", "fail/s", "workers"):  # fmt: skip
        table.add_column(name, justify="left" if name == "domain" else "right", min_width=len(name))
    for d, workers in stats:
        counts = d.counts_by_status
        table.add_row(
            d.domain,
            *(_count(counts.get(s), s in d.counts_estimated) for s in _STATUSES),
            str(d.tsq_size),
            str(d.queue_depth),
            _age(d.oldest_waiting_seconds),
            f"{d.completed_per_s:.1f}",
            f"{d.failed_per_s:.1f}",
            str(workers),
        )
    table.caption = (
        "running: leased or waiting out a retry's backoff; depth: messages in the queue; "
        "oldest: the oldest visible message's wait; ~: an estimate from the planner's "
        "statistics (as fresh as the last ANALYZE), ?: none yet"
    )
    table.caption_justify = "left"
    return table


def stats(
    domain: DomainOption = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between refreshes (--watch).")
    ] = 2.0,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per domain: commands by status, TSQ size, queue depth, oldest waiting message, and the
    recent completed / failed rate."""
    from commandbus.ops.monitor import Monitor

    if watch and as_json:
        raise CliError("--watch and --json do not go together (poll `rcmd stats --json`)")

    async def read(monitor: Monitor) -> list[tuple[Any, int]]:
        rows = await monitor.domain_stats()
        workers: dict[str, int] = {}
        for w in await monitor.workers():
            if w.connected:
                workers[w.domain] = workers.get(w.domain, 0) + 1
        return [(d, workers.get(d.domain, 0)) for d in rows if domain in (None, d.domain)]

    async def go() -> list[tuple[Any, int]] | None:
        async with connect(dsn) as pool:
            if domain is not None:
                await check_domain(pool, domain)
            monitor = Monitor(pool)
            if not watch:
                return await read(monitor)
            try:
                if not stdout.is_terminal:  # into a pipe or a file: one table per refresh
                    while True:
                        stdout.print(_stats_table(await read(monitor)))
                        await asyncio.sleep(interval)
                table = _stats_table(await read(monitor))
                with Live(table, console=stdout, auto_refresh=False) as live:
                    while True:
                        await asyncio.sleep(interval)
                        live.update(_stats_table(await read(monitor)), refresh=True)
            except asyncio.CancelledError:  # Ctrl-C
                return None

    try:
        rows = run(go())
    except KeyboardInterrupt:
        return
    if rows is None:
        return
    if as_json:
        print_json([{**plain(d), "workers": n} for d, n in rows])
    elif not rows:
        stdout.print("no domains yet")
    else:
        stdout.print(_stats_table(rows))


# -- prune ----------------------------------------------------------------------------------


def prune(
    older_than: Annotated[
        str,
        typer.Option("--older-than", help="Age of the finished commands to delete: 30d, 12h, 90m."),
    ],
    domain: DomainOption = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, help="Commands deleted per transaction.")
    ] = 1_000,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete COMPLETED, FAILED and CANCELED commands last updated before the cutoff, with
    their audit rows and archived messages (nothing pending, in flight or in the TSQ)."""
    age = parse_duration(older_than, "--older-than")

    async def go() -> Any:
        from commandbus.retention import PruneResult
        from commandbus.retention import prune as prune_commands

        async with connect(dsn) as pool:
            if domain is not None:
                await check_domain(pool, domain)
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                console=stderr, transient=True, disable=not stderr.is_terminal,
            ) as progress:  # fmt: skip
                task = progress.add_task("pruning")

                def step(r: PruneResult) -> None:
                    progress.update(
                        task,
                        description=f"pruning: {r.command_partitions} day partitions dropped, "
                        f"{r.commands} commands deleted",
                    )

                return await prune_commands(
                    pool, age, domain, chunk_size=chunk_size, on_progress=step
                )

    result = run(go())
    if as_json:
        print_json(result)
        return
    stdout.print(
        f"dropped {result.command_partitions} day partitions of commands "
        f"(~{result.command_partition_rows} rows, {result.command_partitions_kept} kept); "
        f"pruned {result.commands} commands, {result.payloads} archived payloads, "
        f"{result.messages} messages, {result.batches} batches (updated before "
        f"{result.cutoff:%Y-%m-%d %H:%M:%S %Z}); audit trail: {result.partitions} day "
        f"partitions dropped (~{result.partition_rows} rows), {result.audit_events} rows deleted",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    from commandbus.cli.tsq import tsq_app

    app.add_typer(tsq_app, name="tsq")
    app.add_typer(commands_app, name="commands")
    app.command("audit")(audit_command)
    app.add_typer(batches_app, name="batches")
    app.command()(stats)
    app.command()(prune)
