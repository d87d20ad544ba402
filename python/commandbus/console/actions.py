"""The console's actions: every state-changing request is a POST here, checked for its CSRF
token and refused in read-only mode. TSQ actions call the same row-locked operator functions as
the API (`commandbus.ops.TroubleshootingQueue`), so a console action racing a worker or another
operator gets the same typed error, shown on the page."""

from __future__ import annotations

import json
from typing import Annotated, Any
from uuid import UUID, uuid4

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from commandbus import e2e
from commandbus.console.app import Console, get_console, redirect
from commandbus.console.jobs import Job, Progress
from commandbus.console.pages import behavior_from, count_from
from commandbus.console.security import CSRF_FIELD, CSRF_HEADER
from commandbus.exceptions import CommandBusError, InvalidOperationError, ValidationError

router = APIRouter()
C = Annotated[Console, Depends(get_console)]

OPERATOR_COOKIE = "rcmd_operator"
#: TSQ commands completed per page read by a bulk complete.
_COMPLETE_PAGE = 500


class Refused(Exception):
    """A POST refused before it did anything (CSRF, read-only): HTTP `status`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def _form(request: Request, console: Console) -> dict[str, str]:
    """The request's form fields, after the CSRF and read-only checks."""
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    submitted = fields.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not console.guard.csrf_ok(request, submitted):
        raise Refused(403, "missing or wrong CSRF token: reload the page and try again")
    if console.settings.read_only:
        raise Refused(403, "the console is read-only")
    return fields


def _operator(request: Request, fields: dict[str, str]) -> str:
    """The operator's name (the form's, else the basic-auth user); recorded with the action."""
    name = (fields.get("operator") or "").strip()
    if not name:
        user = getattr(request.state, "user", "") or ""
        name = user if user not in ("", "token") else ""
    if not name:
        raise ValidationError("operator", name, "is required: say who acts")
    if len(name) > 100:
        raise ValidationError("operator", name, "must be at most 100 characters")
    return name


def _remember(response: Response, operator: str) -> Response:
    response.set_cookie(OPERATOR_COOKIE, operator, httponly=True, samesite="strict")
    return response


def _uuid(field: str, value: str | None) -> UUID:
    try:
        return UUID((value or "").strip())
    except ValueError:
        raise ValidationError(field, value, "is not a UUID") from None


def _back(fields: dict[str, str], default: str) -> str:
    target = fields.get("next") or default
    # Only paths of this console: never an absolute URL (an open redirect).
    return target if target.startswith("/") and not target.startswith("//") else default


# -- troubleshooting queue ------------------------------------------------------------------


@router.post("/tsq/{action}")
async def tsq_action(request: Request, console: C, action: str) -> Response:
    fields = await _form(request, console)
    domain = (fields.get("domain") or "").strip()
    cid = _uuid("command_id", fields.get("command_id"))
    back = _back(fields, f"/commands/{domain}/{cid}")
    operator = _operator(request, fields)
    try:
        if action == "retry":
            msg_id = await console.tsq.operator_retry(domain, cid, operator)
            msg = f"retried {cid} (new message {msg_id})"
        elif action == "cancel":
            reason = (fields.get("reason") or "").strip() or "canceled in the console"
            await console.tsq.operator_cancel(domain, cid, reason, operator)
            msg = f"canceled {cid}"
        elif action == "complete":
            result = _json_object("result", fields.get("result"))
            await console.tsq.operator_complete(domain, cid, result, operator)
            msg = f"completed {cid}"
        else:
            raise ValidationError("action", action, "must be retry, cancel or complete")
    except CommandBusError as exc:
        return _remember(redirect(back, err=str(exc)), operator)
    return _remember(redirect(back, msg=msg), operator)


def _json_object(field: str, text: str | None) -> dict[str, Any] | None:
    raw = (text or "").strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationError(field, raw, f"is not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ValidationError(field, raw, "must be a JSON object")
    return value


@router.post("/tsq-bulk")
async def tsq_bulk(request: Request, console: C) -> Response:
    fields = await _form(request, console)
    action = fields.get("action", "")
    domain = (fields.get("domain") or "").strip()
    ctype = (fields.get("command_type") or "").strip() or None
    operator = _operator(request, fields)
    expected = count_from(fields, "expected", 0)
    tsq = console.tsq
    if action not in ("retry", "cancel", "complete"):
        raise ValidationError("action", action, "must be retry, cancel or complete")
    reason = (fields.get("reason") or "").strip() or "canceled in bulk in the console"
    result = _json_object("result", fields.get("result"))
    what = f"{action} {expected:,} TSQ commands of {domain}" + (f" ({ctype})" if ctype else "")

    async def run(job: Job, progress: Progress) -> str:
        if action == "retry":
            n = await tsq.retry_all(domain, ctype, operator, on_progress=progress)
            return f"retried {n:,}"
        if action == "cancel":
            n = await tsq.cancel_all(domain, reason, ctype, operator, on_progress=progress)
            return f"canceled {n:,}"
        done = raced = 0
        seen: set[UUID] = set()
        while True:
            page = [
                i
                for i in await tsq.list_troubleshooting(domain, ctype, _COMPLETE_PAGE, 0)
                if i.command_id not in seen
            ]
            if not page:
                break
            for item in page:
                seen.add(item.command_id)
                try:
                    await tsq.operator_complete(domain, item.command_id, result, operator)
                    done += 1
                except InvalidOperationError:
                    raced += 1  # another operator or a retry got there first
                progress(done)
        return f"completed {done:,}" + (f" ({raced:,} had left the TSQ)" if raced else "")

    job = console.jobs.start(what.capitalize(), expected, operator, run)
    job.link = f"/tsq?domain={domain}"
    return _remember(redirect(f"/jobs/{job.id}"), operator)


@router.post("/operator")
async def set_operator(request: Request, console: C) -> Response:
    """Remember the operator's name (a cookie) for the row actions of the TSQ page."""
    fields = await _form(request, console)
    operator = _operator(request, fields)
    return _remember(redirect(_back(fields, "/tsq"), msg=f"acting as {operator}"), operator)


# -- send, bulk generation ------------------------------------------------------------------


@router.post("/send", response_class=HTMLResponse)
async def send(request: Request, console: C) -> Response:
    fields = await _form(request, console)
    form = {k: fields.get(k, "") for k in ("domain", "command_type", "command_id", "data")}
    form |= {k: fields.get(k, "") for k in ("reply_to", "max_attempts", "correlation_id")}
    try:
        domain = form["domain"].strip()
        data = _json_object("data", form["data"]) or {}
        cid = _uuid("command_id", form["command_id"]) if form["command_id"].strip() else uuid4()
        max_attempts = count_from(fields, "max_attempts", 0) or None
        correlation = form["correlation_id"].strip()
        await console.bus.send(
            domain,
            form["command_type"].strip(),
            cid,
            data,
            correlation_id=_uuid("correlation_id", correlation) if correlation else None,
            reply_to=form["reply_to"].strip() or None,
            max_attempts=max_attempts,
        )
    except CommandBusError as exc:
        return console.render(
            request,
            "send.html",
            {"title": "Send a command", "form": form, "error": str(exc)},
            status_code=400,
        )
    return redirect(f"/commands/{domain}/{cid}", msg=f"sent {cid}")


@router.post("/e2e/generate")
async def generate(request: Request, console: C) -> Response:
    fields = await _form(request, console)
    behavior = behavior_from(fields)
    count = count_from(fields)
    if not 1 <= count <= e2e.MAX_BULK:
        raise ValidationError("count", count, f"must be from 1 to {e2e.MAX_BULK:,}")
    batch_name = (fields.get("batch_name") or "").strip() or None
    if fields.get("as_batch") and batch_name is None:
        batch_name = f"bulk of {count:,}"
    if batch_name is not None and count > e2e.MAX_BATCH:
        raise ValidationError("count", count, f"a batch holds at most {e2e.MAX_BATCH:,} commands")
    max_attempts = count_from(fields, "max_attempts", 0) or None
    operator = (fields.get("operator") or "").strip() or "console"
    bus = console.bus

    async def run(job: Job, progress: Progress) -> str:
        result = await e2e.generate(
            bus,
            count,
            behavior,
            batch_name=batch_name,
            max_attempts=max_attempts,
            on_progress=lambda done, _total: progress(done),
        )
        if result.batch_id is not None:
            job.link = f"/batches/{e2e.DOMAIN}/{result.batch_id}"
        rate = result.count / result.seconds if result.seconds > 0 else 0.0
        return f"sent {result.count:,} commands in {result.seconds:.1f} s ({rate:,.0f}/s)"

    title = f"Generate {count:,} E2E commands" + (f" as batch {batch_name!r}" if batch_name else "")
    job = console.jobs.start(title, count, operator, run)
    job.link = f"/commands?domain={e2e.DOMAIN}"
    if request.headers.get("hx-request"):
        return console.render(request, "_job.html", {"job": job})
    return redirect(f"/jobs/{job.id}")
