"""The console's actions (POST + CSRF), read-only mode and authentication."""

from __future__ import annotations

import base64
import os
import re
import time
from urllib.parse import unquote_plus

import pytest
from fastapi.testclient import TestClient

from commandbus.console.settings import ConsoleSettings
from commandbus.exceptions import ValidationError

from .conftest import XSS, Seeded, csrf, make_client, query


def _status(url: str, cid: object) -> str:
    [(status,)] = query(url, "SELECT status FROM commandbus.command WHERE command_id = %s", cid)
    return str(status)


def _operator_of(url: str, cid: object, event: str) -> str:
    [(details,)] = query(
        url,
        "SELECT details_json FROM commandbus.audit WHERE command_id = %s AND event_type = %s",
        cid,
        event,
    )
    return str(details.get("operator"))


def test_single_tsq_actions_record_the_operator(
    client: TestClient, seeded: Seeded, database_url: str
) -> None:
    retry, cancel, complete = seeded.tsq[:3]
    r = client.post(
        "/tsq/retry",
        data={
            "csrf_token": csrf(client),
            "domain": "orders",
            "command_id": str(retry),
            "operator": "alice",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and "msg=retried" in r.headers["location"]
    assert _status(database_url, retry) == "PENDING"
    assert _operator_of(database_url, retry, "OPERATOR_RETRY") == "alice"
    assert client.cookies.get("rcmd_operator") == "alice"
    r = client.post(
        "/tsq/cancel",
        data={
            "csrf_token": csrf(client),
            "domain": "orders",
            "command_id": str(cancel),
            "operator": "bob",
            "reason": "duplicate",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert _status(database_url, cancel) == "CANCELED"
    assert _operator_of(database_url, cancel, "OPERATOR_CANCEL") == "bob"
    r = client.post(
        "/tsq/complete",
        data={
            "csrf_token": csrf(client),
            "domain": "orders",
            "command_id": str(complete),
            "operator": "carol",
            "result": '{"by": "hand"}',
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert _status(database_url, complete) == "COMPLETED"
    [(result,)] = query(
        database_url, "SELECT result FROM commandbus.command WHERE command_id = %s", complete
    )
    assert result == {"by": "hand"}
    # The same row-locked function refuses a command no longer in the TSQ: a typed error shown.
    r = client.post(
        "/tsq/retry",
        data={
            "csrf_token": csrf(client),
            "domain": "orders",
            "command_id": str(cancel),
            "operator": "alice",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and "err=" in r.headers["location"]
    assert "troubleshooting" in unquote_plus(r.headers["location"]).lower()
    page = client.get(r.headers["location"])
    assert 'role="alert"' in page.text


def test_actions_need_csrf_an_operator_and_write_mode(
    client: TestClient, seeded: Seeded, database_url: str
) -> None:
    cid = str(seeded.tsq[0])
    form = {"domain": "orders", "command_id": cid, "operator": "mallory"}
    assert client.post("/tsq/retry", data=form).status_code == 403
    assert client.post("/tsq/retry", data={**form, "csrf_token": "x" * 43}).status_code == 403
    r = client.post(
        "/tsq/retry",
        data={**form, "csrf_token": csrf(client)},
        headers={"Origin": "http://evil.example"},
    )
    assert r.status_code == 403
    r = client.post("/tsq/retry", data={**form, "operator": " ", "csrf_token": csrf(client)})
    assert r.status_code == 400 and "operator" in r.text
    assert _status(database_url, cid) == "IN_TROUBLESHOOTING_QUEUE"
    # htmx sends the token in a header.
    r = client.post(
        "/tsq/retry", data=form, headers={"X-CSRF-Token": csrf(client)}, follow_redirects=False
    )
    assert r.status_code == 303 and _status(database_url, cid) == "PENDING"
    assert client.get("/tsq/retry").status_code == 405  # no action on GET


def test_read_only_shows_everything_and_refuses_actions(seeded: Seeded, database_url: str) -> None:
    with make_client(database_url, read_only=True) as ro:
        detail = ro.get(f"/commands/orders/{seeded.tsq[0]}")
        assert detail.status_code == 200 and "<form" not in detail.text
        assert "read-only" in detail.text
        tsq = ro.get("/tsq")
        assert tsq.status_code == 200 and str(seeded.tsq[0]) in tsq.text
        assert 'method="post"' not in tsq.text
        for path in ("/", "/commands", "/batches", "/processes", "/send", "/e2e"):
            assert ro.get(path).status_code == 200
        r = ro.post(
            "/tsq/retry",
            data={
                "csrf_token": csrf(ro),
                "domain": "orders",
                "command_id": str(seeded.tsq[0]),
                "operator": "x",
            },
        )
        assert r.status_code == 403 and "read-only" in r.text
    assert _status(database_url, seeded.tsq[0]) == "IN_TROUBLESHOOTING_QUEUE"


def _wait_job(client: TestClient, location: str) -> str:
    job_id = int(location.rsplit("/", 1)[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        frag = client.get(f"/fragments/jobs/{job_id}").text
        state = re.search(r'data-state="(\w+)"', frag)
        assert state is not None
        if state.group(1) != "running":
            assert state.group(1) == "done", frag
            return frag
        time.sleep(0.05)
    raise AssertionError("job did not finish")


@pytest.mark.parametrize(
    ("action", "status", "event"),
    [
        ("retry", "PENDING", "OPERATOR_RETRY"),
        ("cancel", "CANCELED", "OPERATOR_CANCEL"),
        ("complete", "COMPLETED", "OPERATOR_COMPLETE"),
    ],
)
def test_bulk_tsq_actions(
    client: TestClient, seeded: Seeded, database_url: str, action: str, status: str, event: str
) -> None:
    r = client.post(
        "/tsq-bulk",
        data={
            "csrf_token": csrf(client),
            "action": action,
            "domain": "orders",
            "operator": "dora",
            "expected": str(len(seeded.tsq)),
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"].startswith("/jobs/")
    frag = _wait_job(client, r.headers["location"])
    assert f"data-done>{len(seeded.tsq)}<" in frag
    assert client.get(r.headers["location"]).status_code == 200
    for cid in seeded.tsq:
        assert _status(database_url, cid) == status
        assert _operator_of(database_url, cid, event) == "dora"


def test_send_form(client: TestClient, database_url: str) -> None:
    r = client.post(
        "/send",
        data={
            "csrf_token": csrf(client),
            "domain": "billing",
            "command_type": "Invoice",
            "command_id": "",
            "data": '{"note": "' + XSS.replace("'", "") + '"}',
            "max_attempts": "2",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    cid = r.headers["location"].split("?")[0].rsplit("/", 1)[1]
    assert _status(database_url, cid) == "PENDING"
    detail = client.get(r.headers["location"])
    assert "&lt;script&gt;" in detail.text and "<script>alert" not in detail.text
    bad = client.post(
        "/send",
        data={
            "csrf_token": csrf(client),
            "domain": "billing",
            "command_type": "Invoice",
            "data": "{not json " + XSS,
        },
    )
    assert bad.status_code == 400 and "data" in bad.text and "<script>alert" not in bad.text
    bad = client.post(
        "/send",
        data={
            "csrf_token": csrf(client),
            "domain": "bad domain!",
            "command_type": "X",
            "data": "{}",
        },
    )
    assert bad.status_code == 400 and "domain" in bad.text


def test_bulk_generation_and_batch_creation(client: TestClient, database_url: str) -> None:
    r = client.post(
        "/e2e/generate",
        data={
            "csrf_token": csrf(client),
            "count": "1,500",
            "fail_permanent_pct": "10",
            "fail_transient_pct": "5",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    frag = _wait_job(client, r.headers["location"])
    assert "sent 1,500 commands" in frag
    [(n,)] = query(database_url, "SELECT count(*) FROM commandbus.command WHERE domain = 'e2e'")
    assert n == 1500
    [(data,)] = query(database_url, "SELECT message FROM pgmq.q_e2e__commands LIMIT 1")
    assert data["data"]["behavior"] == {"fail_permanent_pct": 10.0, "fail_transient_pct": 5.0}
    # htmx: the job's fragment comes back in place.
    r = client.post(
        "/e2e/generate",
        data={"csrf_token": csrf(client), "count": "40", "batch_name": "nightly <b>"},
        headers={"HX-Request": "true"},
    )
    assert r.status_code == 200 and 'hx-get="/fragments/jobs/' in r.text
    job = re.search(r'id="job-(\d+)"', r.text)
    assert job is not None
    frag = _wait_job(client, f"/jobs/{job.group(1)}")
    link = re.search(r'href="(/batches/e2e/[0-9a-f-]+)"', frag)
    assert link is not None
    batch = client.get(link.group(1))
    assert batch.status_code == 200 and "nightly &lt;b&gt;" in batch.text
    assert len(re.findall(r"data-command-id=", batch.text)) == 40
    listed = client.get("/batches", params={"domain": "e2e"})
    assert "nightly &lt;b&gt;" in listed.text and 'class="progress"' in listed.text
    bad = client.post("/e2e/generate", data={"csrf_token": csrf(client), "count": "0"})
    assert bad.status_code == 400 and "count" in bad.text
    bad = client.post(
        "/e2e/generate",
        data={"csrf_token": csrf(client), "count": "200000", "batch_name": "too big"},
    )
    assert bad.status_code == 400


def test_authentication(database_url: str) -> None:
    token = "t" * 24
    with make_client(database_url, token=token) as c:
        assert c.get("/").status_code == 401
        assert c.get("/static/console.css").status_code == 200  # static files are public
        assert c.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/login", params={"token": "wrong"}).status_code == 401
        r = c.get("/login", params={"token": token}, follow_redirects=False)
        assert r.status_code == 303 and "rcmd_session" in r.headers["set-cookie"]
        assert c.get("/").status_code == 200  # the session cookie
    with make_client(database_url, username="op", password="s3cret") as c:
        r = c.get("/")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        good = base64.b64encode(b"op:s3cret").decode()
        bad = base64.b64encode(b"op:nope").decode()
        assert c.get("/", headers={"Authorization": f"Basic {good}"}).status_code == 200
        assert c.get("/", headers={"Authorization": f"Basic {bad}"}).status_code == 401


def test_settings_refuse_unsafe_listening() -> None:
    with pytest.raises(ValidationError, match="host"):
        ConsoleSettings.from_env(host="0.0.0.0", env={})
    with pytest.raises(ValidationError, match="RCMD_CONSOLE_TOKEN"):
        ConsoleSettings.from_env(host="0.0.0.0", env={"RCMD_CONSOLE_TOKEN": "short"})
    with pytest.raises(ValidationError, match="RCMD_CONSOLE_PASSWORD"):
        ConsoleSettings.from_env(env={"RCMD_CONSOLE_USER": "op"})
    ok = ConsoleSettings.from_env(host="0.0.0.0", env={"RCMD_CONSOLE_TOKEN": "x" * 16})
    assert ok.requires_auth
    assert not ConsoleSettings.from_env(host="::1", env={}).requires_auth
    assert not ConsoleSettings.from_env(host="localhost", env={}).requires_auth


def test_serve_refuses_bad_config_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from commandbus.console import serve

    monkeypatch.delenv("RCMD_CONSOLE_TOKEN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ValidationError, match="loopback"):
        serve(dsn="postgresql://nowhere/db", host="0.0.0.0")
    with pytest.raises(ValidationError, match="dsn"):
        serve()
    with pytest.raises(ValidationError, match="embedded"):
        serve(dsn="postgresql://nowhere/db", embedded=True)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "commandbus.console",
            "--host",
            "0.0.0.0",
            "--dsn",
            "postgresql://x/y",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("RCMD_CONSOLE")},
    )
    assert out.returncode == 2 and "loopback" in out.stderr and "Traceback" not in out.stderr
