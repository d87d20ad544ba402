"""The operator's commands: `rcmd tsq ...`, `commands ...`, `audit`, `batches ...`, `stats`,
`prune`. Each reads or acts through the library's public API (TroubleshootingQueue, CommandBus,
retention, the Monitor read model)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from uuid import UUID

import typer
from psycopg_pool import AsyncConnectionPool
from rich.live import Live
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from commandbus import _db
from commandbus.bus import CommandBus
from commandbus.cli._common import (
    CliError,
    DsnOption,
    JsonOption,
    check_domain,
    confirm,
    default_operator,
    open_pool,
    parse_datetime,
    parse_duration,
    parse_json_object,
    parse_uuid,
    plain,
    print_fields,
    print_json,
    print_table,
    run,
    stderr,
    stdout,
)
from commandbus.exceptions import CommandNotFoundError, InvalidOperationError
from commandbus.models import BatchStatus, CommandMetadata, CommandStatus, TroubleshootingItem
from commandbus.ops.troubleshooting import TroubleshootingQueue

DomainOption = Annotated[str | None, typer.Option("--domain", help="Only this domain.")]
RequiredDomain = Annotated[str, typer.Option("--domain", help="The domain.")]
TypeOption = Annotated[str | None, typer.Option("--type", help="Only this command type.")]
LimitOption = Annotated[int, typer.Option("--limit", min=1, max=10_000, help="Most rows shown.")]
OperatorOption = Annotated[
    str | None,
    typer.Option("--operator", help="Name written in the audit trail (default: the OS user)."),
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
AllOption = Annotated[
    bool, typer.Option("--all", help="Every TSQ command matching --domain / --type.")
]
IdsArgument = Annotated[
    list[str] | None, typer.Argument(metavar="[COMMAND_ID]...", help="Command ids.")
]

tsq_app = typer.Typer(
    help="The troubleshooting queue: list, show, retry, cancel, complete.", no_args_is_help=True
)
commands_app = typer.Typer(help="Commands: list with filters, show one.", no_args_is_help=True)
batches_app = typer.Typer(help="Batches: list, show one with its commands.", no_args_is_help=True)


def _pool(dsn: str | None) -> Any:
    return open_pool(dsn)


async def _domain_of(pool: AsyncConnectionPool[Any], command_id: UUID, domain: str | None) -> str:
    if domain is not None:
        return await check_domain(pool, domain)
    try:
        return await TroubleshootingQueue(pool).get_command_domain(command_id)
    except CommandNotFoundError:
        raise CliError(f"no command {command_id} in any domain") from None


# -- tsq ------------------------------------------------------------------------------------

_TSQ_COLUMNS = ["domain", "command_id", "type", "tries", "error", "updated"]


def _tsq_row(item: TroubleshootingItem) -> list[Any]:
    error = ": ".join(x for x in (item.last_error_code, item.last_error_msg) if x)
    return [item.domain, item.command_id, item.command_type,
            f"{item.attempts}/{item.max_attempts}", error, item.updated_at]  # fmt: skip


@tsq_app.command("list")
def tsq_list(
    domain: DomainOption = None,
    command_type: TypeOption = None,
    limit: LimitOption = 50,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the commands in the troubleshooting queue, most recently failed first."""

    async def go() -> tuple[list[TroubleshootingItem], int]:
        async with _pool(dsn) as pool:
            tsq = TroubleshootingQueue(pool)
            if command_type is not None:
                if domain is None:
                    raise CliError("--type needs --domain")
                await check_domain(pool, domain)
                items = await tsq.list_troubleshooting(domain, command_type, limit)
                return items, await tsq.count_troubleshooting(domain, command_type)
            if domain is not None:
                await check_domain(pool, domain)
            items, total, _ids = await tsq.list_all_troubleshooting(limit, 0, domain)
            return items, total

    items, total = run(go())
    if as_json:
        print_json({"total": total, "items": items})
        return
    print_table(
        f"troubleshooting queue: {total} commands"
        + (f" ({len(items)} shown)" if total > len(items) else ""),
        _TSQ_COLUMNS,
        (_tsq_row(i) for i in items),
        empty="the troubleshooting queue is empty",
    )


@tsq_app.command("show")
def tsq_show(
    command_id: Annotated[str, typer.Argument(help="The command id.")],
    domain: DomainOption = None,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one command of the TSQ: its error, its payload and its audit trail."""
    cid = parse_uuid(command_id, "command id")

    async def go() -> tuple[CommandMetadata, Any, list[Any]]:
        async with _pool(dsn) as pool:
            dom = await _domain_of(pool, cid, domain)
            bus = CommandBus(pool)
            try:
                meta = await bus.get_command(dom, cid)
                if meta is None:
                    raise CliError(f"no command {cid} in domain {dom!r}")
                payload = await _db.fetch_value(pool, "cli_tsq_payload", dom, cid, domain=dom)
                audit = await bus.get_audit_trail(cid, dom)
            finally:
                await bus.close()
            return meta, payload, audit

    meta, payload, audit = run(go())
    if meta.status is not CommandStatus.IN_TROUBLESHOOTING_QUEUE:
        stderr.print(f"note: command {cid} is {meta.status.value}, not in the TSQ", markup=False)
    if as_json:
        print_json({"command": meta, "payload": payload, "audit": audit})
        return
    _print_command(meta)
    print_fields("payload", [("message", payload)])
    _print_audit(audit)


async def _bulk_count(
    tsq: TroubleshootingQueue, domains: list[str], command_type: str | None
) -> dict[str, int]:
    counts = {d: await tsq.count_troubleshooting(d, command_type) for d in domains}
    return {d: n for d, n in counts.items() if n}


async def _target_domains(
    pool: AsyncConnectionPool[Any], tsq: TroubleshootingQueue, domain: str | None
) -> list[str]:
    if domain is not None:
        return [await check_domain(pool, domain)]
    return await tsq.list_domains()


def _check_selection(
    ids: list[str] | None, all_: bool, command_type: str | None, domain: str | None
) -> list[UUID]:
    if all_ and ids:
        raise CliError("give command ids or --all, not both")
    if not all_ and not ids:
        raise CliError("give one or more command ids, or --all (with --domain / --type filters)")
    if not all_ and (command_type is not None):
        raise CliError("--type filters --all only")
    if all_ and command_type is not None and domain is None:
        raise CliError("--type needs --domain")
    return [parse_uuid(i, "command id") for i in ids or []]


_ASK = {"retried": "Retry", "canceled": "Cancel", "completed": "Complete"}

BulkAction = Callable[[TroubleshootingQueue, str, Callable[[int], None]], Awaitable[int]]
OneAction = Callable[[TroubleshootingQueue, str, UUID], Awaitable[Any]]


def _act(
    verb: str,
    dsn: str | None,
    ids: list[UUID],
    domain: str | None,
    command_type: str | None,
    yes: bool,
    one: OneAction,
    bulk: BulkAction,
    as_json: bool,
) -> None:
    """A TSQ action on the given ids, or on every TSQ command matching the filters (--all):
    the count is shown and confirmed first (unless --yes)."""

    async def go() -> dict[str, Any]:
        async with _pool(dsn) as pool:
            tsq = TroubleshootingQueue(pool)
            if ids:
                done: list[str] = []
                failed: dict[str, str] = {}
                for cid in ids:
                    dom = await _domain_of(pool, cid, domain)
                    try:
                        await one(tsq, dom, cid)
                        done.append(str(cid))
                    except (InvalidOperationError, CommandNotFoundError) as exc:
                        failed[str(cid)] = str(exc)
                return {"done": done, "failed": failed}
            domains = await _target_domains(pool, tsq, domain)
            counts = await _bulk_count(tsq, domains, command_type)
            total = sum(counts.values())
            if total == 0:
                return {"done": 0, "by_domain": {}}
            where = ", ".join(f"{d}: {n}" for d, n in counts.items())
            confirm(f"{_ASK[verb]} {total} TSQ commands ({where})?", yes)
            result: dict[str, int] = {}
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                console=stderr, transient=True, disable=not stderr.is_terminal,
            ) as progress:  # fmt: skip
                for dom in counts:
                    task = progress.add_task(f"{verb} {dom}: 0/{counts[dom]}")

                    def step(n: int, dom: str = dom, task: Any = task) -> None:
                        progress.update(task, description=f"{verb} {dom}: {n}/{counts[dom]}")

                    result[dom] = await bulk(tsq, dom, step)
            return {"done": sum(result.values()), "by_domain": result}

    outcome = run(go())
    if as_json:
        print_json(outcome)
    elif isinstance(outcome["done"], list):
        for cid in outcome["done"]:
            stdout.print(f"{verb}: {cid}", markup=False)
        for cid, why in outcome["failed"].items():
            stderr.print(f"error: {cid}: {why}", markup=False)
    else:
        stdout.print(f"{verb}: {outcome['done']} commands", markup=False)
    if isinstance(outcome["done"], list) and outcome["failed"]:
        raise typer.Exit(1)


@tsq_app.command("retry")
def tsq_retry(
    command_ids: IdsArgument = None,
    all_: AllOption = False,
    domain: DomainOption = None,
    command_type: TypeOption = None,
    operator: OperatorOption = None,
    yes: YesOption = False,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send TSQ commands again (status PENDING, attempts 0)."""
    ids = _check_selection(command_ids, all_, command_type, domain)
    who = operator or default_operator()
    _act(
        "retried", dsn, ids, domain, command_type, yes,
        lambda tsq, d, cid: tsq.operator_retry(d, cid, operator=who),
        lambda tsq, d, step: tsq.retry_all(d, command_type, who, on_progress=step),
        as_json,
    )  # fmt: skip


@tsq_app.command("cancel")
def tsq_cancel(
    command_ids: IdsArgument = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (stored, and sent in the CANCELED reply).")
    ] = "canceled by an operator",
    all_: AllOption = False,
    domain: DomainOption = None,
    command_type: TypeOption = None,
    operator: OperatorOption = None,
    yes: YesOption = False,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel TSQ commands (status CANCELED, a CANCELED reply where they have a reply queue)."""
    ids = _check_selection(command_ids, all_, command_type, domain)
    who = operator or default_operator()
    _act(
        "canceled", dsn, ids, domain, command_type, yes,
        lambda tsq, d, cid: tsq.operator_cancel(d, cid, reason, operator=who),
        lambda tsq, d, step: tsq.cancel_all(d, reason, command_type, who, on_progress=step),
        as_json,
    )  # fmt: skip


async def _complete_all(
    tsq: TroubleshootingQueue,
    domain: str,
    command_type: str | None,
    result: dict[str, Any] | None,
    operator: str,
    step: Callable[[int], None],
) -> int:
    """Complete every TSQ command of the domain (of one type) that was there at the start, one
    transaction each (the library has no bulk complete: completing by hand is rare)."""
    ids: list[UUID] = []
    page = 500
    while True:
        items = await tsq.list_troubleshooting(domain, command_type, page, len(ids))
        ids += [i.command_id for i in items]
        if len(items) < page:
            break
    done = 0
    for cid in ids:
        try:
            await tsq.operator_complete(domain, cid, result, operator=operator)
        except InvalidOperationError:
            continue  # another operator acted on it meanwhile
        done += 1
        step(done)
    return done


@tsq_app.command("complete")
def tsq_complete(
    command_ids: IdsArgument = None,
    result: Annotated[
        str | None, typer.Option("--result", help="JSON object stored as the command's result.")
    ] = None,
    all_: AllOption = False,
    domain: DomainOption = None,
    command_type: TypeOption = None,
    operator: OperatorOption = None,
    yes: YesOption = False,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Complete TSQ commands by hand (status COMPLETED, a SUCCESS reply with --result)."""
    ids = _check_selection(command_ids, all_, command_type, domain)
    data = None if result is None else parse_json_object(result, "--result")
    who = operator or default_operator()
    _act(
        "completed", dsn, ids, domain, command_type, yes,
        lambda tsq, d, cid: tsq.operator_complete(d, cid, data, operator=who),
        lambda tsq, d, step: _complete_all(tsq, d, command_type, data, who, step),
        as_json,
    )  # fmt: skip


# -- commands and audit ---------------------------------------------------------------------


def _print_command(meta: CommandMetadata) -> None:
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


def _print_audit(events: list[Any]) -> None:
    print_table(
        "audit trail",
        ["time", "event", "details"],
        ([e.timestamp, e.event_type, e.details] for e in events),
        empty="no audit events",
    )


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
        async with _pool(dsn) as pool:
            dom = await _domain_of(pool, cid, domain)
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
    _print_command(meta)
    if audit:
        _print_audit(events)


def audit_command(
    command_id: Annotated[str, typer.Argument(help="The command id.")],
    domain: DomainOption = None,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a command's audit trail (every transition, oldest first)."""
    cid = parse_uuid(command_id, "command id")

    async def go() -> list[Any]:
        async with _pool(dsn) as pool:
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
        _print_audit(events)


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
        status=_command_status(status),
        command_type=command_type,
        batch_id=None if batch is None else parse_uuid(batch, "--batch"),
        created_after=parse_datetime(created_after, "--created-after"),
        created_before=parse_datetime(created_before, "--created-before"),
    )

    async def go() -> Any:
        async with _pool(dsn) as pool:
            if domain is not None:
                await check_domain(pool, domain)
            return await Monitor(pool).list_commands(flt, cursor=cursor, limit=limit)

    page = run(go())
    if as_json:
        print_json({"items": page.items, "next_cursor": page.next_cursor})
        return
    _print_commands(f"commands ({len(page.items)} shown)", page.items)
    if page.next_cursor:
        stderr.print(f"more: --cursor {page.next_cursor}", markup=False)


# -- batches --------------------------------------------------------------------------------


def _batch_status(status: str | None) -> BatchStatus | None:
    if status is None:
        return None
    try:
        return BatchStatus(status.upper())
    except ValueError:
        names = ", ".join(s.value for s in BatchStatus)
        raise CliError(f"invalid --status {status!r}: one of {names}") from None


def _command_status(status: str | None) -> CommandStatus | None:
    if status is None:
        return None
    try:
        return CommandStatus(status.upper())
    except ValueError:
        names = ", ".join(s.value for s in CommandStatus)
        raise CliError(f"invalid --status {status!r}: one of {names}") from None


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
    wanted = _batch_status(status)

    async def go() -> list[Any]:
        async with _pool(dsn) as pool:
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
    wanted = _command_status(status)

    async def go() -> tuple[Any, list[CommandMetadata]]:
        async with _pool(dsn) as pool:
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
    _print_commands(f"commands ({len(cmds)} shown)", cmds)


def _print_commands(title: str, cmds: list[CommandMetadata]) -> None:
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
        async with _pool(dsn) as pool:
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

        async with _pool(dsn) as pool:
            if domain is not None:
                await check_domain(pool, domain)
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                console=stderr, transient=True, disable=not stderr.is_terminal,
            ) as progress:  # fmt: skip
                task = progress.add_task("pruning")

                def step(r: PruneResult) -> None:
                    progress.update(task, description=f"pruning: {r.commands} commands deleted")

                return await prune_commands(
                    pool, age, domain, chunk_size=chunk_size, on_progress=step
                )

    result = run(go())
    if as_json:
        print_json(result)
        return
    stdout.print(
        f"pruned {result.commands} commands, {result.audit_events} audit rows, "
        f"{result.payloads} archived payloads, {result.messages} messages, {result.batches} "
        f"batches (updated before {result.cutoff:%Y-%m-%d %H:%M:%S %Z})",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(tsq_app, name="tsq")
    app.add_typer(commands_app, name="commands")
    app.command("audit")(audit_command)
    app.add_typer(batches_app, name="batches")
    app.command()(stats)
    app.command()(prune)
