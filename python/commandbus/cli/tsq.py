"""`rcmd tsq list|show|retry|cancel|complete`: the troubleshooting queue, one command or all
of those matching filters (counted and confirmed first)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from uuid import UUID

import typer
from psycopg_pool import AsyncConnectionPool
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from commandbus import _db
from commandbus.bus import CommandBus
from commandbus.cli._common import (
    CliError,
    DsnOption,
    JsonOption,
    check_domain,
    confirm,
    default_operator,
    parse_json_object,
    parse_uuid,
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
    TypeOption,
    connect,
    domain_of,
    print_audit,
    print_command,
)
from commandbus.exceptions import CommandNotFoundError, InvalidOperationError
from commandbus.models import CommandMetadata, CommandStatus, TroubleshootingItem
from commandbus.ops.troubleshooting import TroubleshootingQueue

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
        async with connect(dsn) as pool:
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
        async with connect(dsn) as pool:
            dom = await domain_of(pool, cid, domain)
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
    print_command(meta)
    print_fields("payload", [("message", payload)])
    print_audit(audit)


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
        async with connect(dsn) as pool:
            tsq = TroubleshootingQueue(pool)
            if ids:
                done: list[str] = []
                failed: dict[str, str] = {}
                for cid in ids:
                    dom = await domain_of(pool, cid, domain)
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
