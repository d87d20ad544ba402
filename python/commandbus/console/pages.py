"""The console's pages and live fragments (GET only: nothing here changes state)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from commandbus import e2e
from commandbus.console.app import Console, get_console
from commandbus.exceptions import CommandBusError, ValidationError
from commandbus.models import BatchStatus, CommandStatus
from commandbus.ops.monitor import BUCKET_SECONDS, CommandFilter, ThroughputPoint
from commandbus.process.models import ProcessStatus

router = APIRouter()
C = Annotated[Console, Depends(get_console)]

PAGE_SIZE = 50
CHART_MINUTES = 10


def _opt(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _uuid(field: str, value: str | None) -> UUID | None:
    v = _opt(value)
    if v is None:
        return None
    try:
        return UUID(v)
    except ValueError:
        raise ValidationError(field, v, "is not a UUID") from None


def _time(field: str, value: str | None) -> datetime | None:
    v = _opt(value)
    if v is None:
        return None
    try:
        ts = datetime.fromisoformat(v)
    except ValueError:
        raise ValidationError(field, v, "is not a date and time (YYYY-MM-DDTHH:MM)") from None
    return ts if ts.tzinfo is not None else ts.astimezone()


def _enum(field: str, value: str | None, kind: type[Any]) -> Any:
    v = _opt(value)
    if v is None:
        return None
    try:
        return kind(v)
    except ValueError:
        raise ValidationError(field, v, f"is not a {kind.__name__}") from None


# -- dashboard ------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request, console: C) -> Response:
    return console.render(request, "dashboard.html", {"title": "Dashboard"})


@router.get("/fragments/stats", response_class=HTMLResponse)
async def stats_fragment(request: Request, console: C) -> Response:
    stats = await console.monitor.domain_stats()
    workers = await console.monitor.workers()
    return console.render(request, "_stats.html", {"stats": stats, "workers": workers})


def chart(points: list[ThroughputPoint], width: int = 720, height: int = 180) -> dict[str, Any]:
    """Polylines of completed/s and failed/s (SVG coordinates) with their axis."""
    peak = max([p.completed_per_s for p in points] + [p.failed_per_s for p in points] + [1.0])
    n = max(len(points) - 1, 1)

    def line(values: list[float]) -> str:
        return " ".join(
            f"{i * width / n:.1f},{height - v * height / peak:.1f}" for i, v in enumerate(values)
        )

    return {
        "width": width,
        "height": height,
        "peak": peak,
        "completed": line([p.completed_per_s for p in points]),
        "failed": line([p.failed_per_s for p in points]),
        "last": points[-1] if points else None,
        "points": points,
    }


@router.get("/fragments/chart", response_class=HTMLResponse)
async def chart_fragment(request: Request, console: C) -> Response:
    points = await console.monitor.throughput(minutes=CHART_MINUTES)
    # The current bucket is still filling: its rate is over the part elapsed.
    return console.render(
        request,
        "_chart.html",
        {
            "chart": chart(points),
            "current": points[-1],
            "minutes": CHART_MINUTES,
            "bucket": BUCKET_SECONDS,
        },
    )


# -- commands -------------------------------------------------------------------------------


@router.get("/commands", response_class=HTMLResponse)
async def commands(
    request: Request,
    console: C,
    domain: str | None = None,
    status: str | None = None,
    command_type: str | None = None,
    batch_id: str | None = None,
    command_id: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
    cursor: str | None = None,
) -> Response:
    form = {
        "domain": domain or "",
        "status": status or "",
        "command_type": command_type or "",
        "batch_id": batch_id or "",
        "command_id": command_id or "",
        "created_after": created_after or "",
        "created_before": created_before or "",
    }
    error = None
    page = None
    try:
        flt = CommandFilter(
            domain=_opt(domain),
            status=_enum("status", status, CommandStatus),
            command_type=_opt(command_type),
            batch_id=_uuid("batch_id", batch_id),
            command_id=_uuid("command_id", command_id),
            created_after=_time("created_after", created_after),
            created_before=_time("created_before", created_before),
        )
        page = await console.monitor.list_commands(flt, cursor=_opt(cursor), limit=PAGE_SIZE)
    except CommandBusError as exc:
        error = str(exc)
    domains = await console.monitor.domains()
    return console.render(
        request,
        "commands.html",
        {
            "title": "Commands",
            "form": form,
            "page": page,
            "error": error,
            "domains": domains,
            "statuses": [s.value for s in CommandStatus],
            "cursor": cursor,
        },
    )


@router.get("/commands/{domain}/{command_id}", response_class=HTMLResponse)
async def command_detail(request: Request, console: C, domain: str, command_id: str) -> Response:
    cid = _uuid("command_id", command_id)
    assert cid is not None
    cmd = await console.bus.get_command(domain, cid)
    if cmd is None:
        return console.render(
            request,
            "error.html",
            {"title": "Not found", "error": f"no command {cid} in domain {domain}"},
            status_code=404,
        )
    audit = await console.bus.get_audit_trail(cid, domain)
    message = await console.monitor.command_message(domain, cmd.msg_id)
    return console.render(
        request,
        "command.html",
        {
            "title": f"Command {cid}",
            "cmd": cmd,
            "audit": audit,
            "message": message,
            "in_tsq": cmd.status is CommandStatus.IN_TROUBLESHOOTING_QUEUE,
        },
    )


# -- troubleshooting queue ------------------------------------------------------------------


@router.get("/tsq", response_class=HTMLResponse)
async def tsq_page(
    request: Request,
    console: C,
    domain: str | None = None,
    command_type: str | None = None,
    offset: int = 0,
) -> Response:
    # The TSQ sizes of all domains in one index walk; a type filter is counted on its own.
    sizes = await console.monitor.tsq_sizes()
    domains = sorted(sizes)
    chosen = _opt(domain) or (domains[0] if domains else None)
    ctype = _opt(command_type)
    items: list[Any] = []
    count = 0
    if chosen is not None:
        offset = max(0, offset)
        items = await console.tsq.list_troubleshooting(chosen, ctype, PAGE_SIZE, offset)
        count = (
            await console.tsq.count_troubleshooting(chosen, ctype)
            if ctype is not None
            else sizes.get(chosen, 0)
        )
    return console.render(
        request,
        "tsq.html",
        {
            "title": "Troubleshooting queue",
            "domains": domains,
            "domain": chosen,
            "command_type": ctype or "",
            "items": items,
            "count": count,
            "offset": offset,
            "page_size": PAGE_SIZE,
        },
    )


@router.get("/tsq/bulk", response_class=HTMLResponse)
async def tsq_bulk_confirm(
    request: Request,
    console: C,
    action: str,
    domain: str,
    command_type: str | None = None,
) -> Response:
    if action not in ("retry", "cancel", "complete"):
        raise ValidationError("action", action, "must be retry, cancel or complete")
    ctype = _opt(command_type)
    count = await console.tsq.count_troubleshooting(domain, ctype)
    return console.render(
        request,
        "tsq_bulk.html",
        {
            "title": f"Bulk {action}",
            "action": action,
            "domain": domain,
            "command_type": ctype or "",
            "count": count,
        },
    )


# -- batches --------------------------------------------------------------------------------


@router.get("/batches", response_class=HTMLResponse)
async def batches(
    request: Request,
    console: C,
    domain: str | None = None,
    status: str | None = None,
    offset: int = 0,
) -> Response:
    domains = await console.monitor.domains()
    chosen = _opt(domain) or (e2e.DOMAIN if e2e.DOMAIN in domains else next(iter(domains), None))
    st = _enum("status", status, BatchStatus)
    items = (
        await console.bus.list_batches(chosen, status=st, limit=PAGE_SIZE, offset=max(0, offset))
        if chosen
        else []
    )
    return console.render(
        request,
        "batches.html",
        {
            "title": "Batches",
            "domains": domains,
            "domain": chosen,
            "status": status or "",
            "statuses": [s.value for s in BatchStatus],
            "items": items,
            "offset": max(0, offset),
            "page_size": PAGE_SIZE,
            "behavior": e2e.Behavior(),
            "max_batch": e2e.MAX_BATCH,
        },
    )


@router.get("/batches/{domain}/{batch_id}", response_class=HTMLResponse)
async def batch_detail(
    request: Request, console: C, domain: str, batch_id: str, cursor: str | None = None
) -> Response:
    bid = _uuid("batch_id", batch_id)
    assert bid is not None
    batch = await console.bus.get_batch(domain, bid)
    if batch is None:
        return console.render(
            request,
            "error.html",
            {"title": "Not found", "error": f"no batch {bid} in domain {domain}"},
            status_code=404,
        )
    page = await console.monitor.list_commands(
        CommandFilter(domain=domain, batch_id=bid), cursor=_opt(cursor), limit=PAGE_SIZE
    )
    return console.render(
        request, "batch.html", {"title": f"Batch {bid}", "batch": batch, "page": page}
    )


# -- processes ------------------------------------------------------------------------------


@router.get("/processes", response_class=HTMLResponse)
async def processes(
    request: Request,
    console: C,
    domain: str | None = None,
    status: str | None = None,
    cursor: str | None = None,
) -> Response:
    domains = await console.monitor.process_domains()
    chosen = _opt(domain) or (domains[0] if domains else None)
    st = _enum("status", status, ProcessStatus)
    page = (
        await console.monitor.list_processes(
            chosen, status=st, cursor=_opt(cursor), limit=PAGE_SIZE
        )
        if chosen
        else None
    )
    return console.render(
        request,
        "processes.html",
        {
            "title": "Processes",
            "domains": domains,
            "domain": chosen,
            "status": status or "",
            "statuses": sorted({s.value for s in ProcessStatus}),
            "page": page,
        },
    )


@router.get("/processes/{domain}/{process_id}", response_class=HTMLResponse)
async def process_detail(request: Request, console: C, domain: str, process_id: str) -> Response:
    pid = _uuid("process_id", process_id)
    assert pid is not None
    process = await console.processes.get_by_id(domain, pid)
    if process is None:
        return console.render(
            request,
            "error.html",
            {"title": "Not found", "error": f"no process {pid} in domain {domain}"},
            status_code=404,
        )
    steps = await console.processes.get_audit_trail(domain, pid)
    return console.render(
        request,
        "process.html",
        {"title": f"Process {pid}", "process": process, "steps": steps},
    )


# -- send, E2E, jobs ------------------------------------------------------------------------


@router.get("/send", response_class=HTMLResponse)
async def send_form(request: Request, console: C) -> Response:
    return console.render(
        request,
        "send.html",
        {"title": "Send a command", "form": {"data": "{}"}, "error": None},
    )


def behavior_from(params: dict[str, str]) -> e2e.Behavior:
    def number(name: str) -> float:
        raw = (params.get(name) or "0").strip()
        try:
            return float(raw)
        except ValueError:
            raise ValidationError(name, raw, "is not a number") from None

    def integer(name: str) -> int:
        raw = (params.get(name) or "0").strip()
        try:
            return int(raw)
        except ValueError:
            raise ValidationError(name, raw, "is not an integer") from None

    return e2e.Behavior(
        fail_permanent_pct=number("fail_permanent_pct"),
        fail_transient_pct=number("fail_transient_pct"),
        timeout_pct=number("timeout_pct"),
        min_duration_ms=integer("min_duration_ms"),
        max_duration_ms=integer("max_duration_ms"),
    )


def count_from(params: dict[str, str], name: str = "count", default: int = 10_000) -> int:
    raw = (params.get(name) or str(default)).strip().replace(",", "").replace("_", "")
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(name, raw, "is not an integer") from None


@router.get("/e2e", response_class=HTMLResponse)
async def e2e_page(request: Request, console: C) -> Response:
    behavior = e2e.Behavior(fail_permanent_pct=2, fail_transient_pct=8)
    return console.render(
        request,
        "e2e.html",
        {
            "title": "E2E: probabilistic commands",
            "behavior": behavior,
            "count": 10_000,
            "expected": e2e.expected_outcomes(behavior, 10_000),
            "max_bulk": e2e.MAX_BULK,
            "max_batch": e2e.MAX_BATCH,
            "jobs": console.jobs.recent()[:10],
        },
    )


@router.get("/e2e/calculator", response_class=HTMLResponse)
async def calculator(request: Request, console: C) -> Response:
    params = dict(request.query_params)
    try:
        behavior = behavior_from(params)
        count = count_from(params)
        attempts = count_from(params, "max_attempts", 3)
        expected = e2e.expected_outcomes(behavior, count, attempts)
        error = None
    except CommandBusError as exc:
        behavior, expected, error = e2e.Behavior(), None, str(exc)
    return console.render(
        request,
        "_calculator.html",
        {"expected": expected, "error": error, "behavior": behavior},
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, console: C, job_id: int) -> Response:
    job = console.jobs.get(job_id)
    if job is None:
        return console.render(
            request, "error.html", {"title": "Not found", "error": "no such job"}, 404
        )
    return console.render(request, "job.html", {"title": job.title, "job": job})


@router.get("/fragments/jobs/{job_id}", response_class=HTMLResponse)
async def job_fragment(request: Request, console: C, job_id: int) -> Response:
    job = console.jobs.get(job_id)
    if job is None:
        return console.render(
            request, "error.html", {"title": "Not found", "error": "no such job"}, 404
        )
    return console.render(request, "_job.html", {"job": job})
