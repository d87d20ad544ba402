"""The console in a real browser: headless Chromium (the system's, /usr/bin/chromium) driven by
Playwright, against the console served by uvicorn with an in-process E2E worker.

Skipped only where no Chromium is installed. With RCMD_SCREENSHOTS=<dir>, the dashboard and
the TSQ page are saved there (docs/img/ holds the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import XSS, Seeded, execute, query

CHROMIUM = os.environ.get("RCMD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium installed (looked for {CHROMIUM})", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

import uvicorn  # noqa: E402

from commandbus.console import _demo_worker, create_app  # noqa: E402
from commandbus.console.app import Console  # noqa: E402
from commandbus.console.settings import ConsoleSettings  # noqa: E402

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(database_url: str, seeded: Seeded) -> Iterator[str]:
    """The console on a free port, with a worker of domain e2e (concurrency 64)."""

    async def worker(console: Console) -> None:
        await _demo_worker(console, 64)

    app = create_app(ConsoleSettings(), dsn=database_url, background=worker)
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=srv.run, name="console-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the console did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def page(server: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1360, "height": 900})
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on(
                "console",
                lambda m: errors.append(m.text) if m.type == "error" else None,
            )
            pg.set_default_timeout(15_000)
            yield pg
            assert errors == [], errors  # no script error, no CSP violation
        finally:
            browser.close()


def _shot(pg: Any, name: str, *, full_page: bool = False) -> None:
    target = os.environ.get("RCMD_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(Path(target) / name), full_page=full_page)


def _until(check: Any, timeout: float = 15.0) -> None:
    """Poll `check()` from the test (page.wait_for_function evaluates a string: the CSP
    forbids that, as it should)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _count(database_url: str, sql: str, *params: Any) -> int:
    return int(query(database_url, sql, *params)[0][0])


def test_every_page_tsq_retry_and_bulk_generation(
    page: Any, server: str, seeded: Seeded, database_url: str
) -> None:
    pg = page
    # Every page opens, with its live parts loaded by htmx.
    pg.goto(server + "/")
    pg.wait_for_selector('[data-domain="orders"]')
    tsq_db = _count(database_url, "SELECT count(*) FROM commandbus.command WHERE in_tsq")
    assert pg.inner_text('[data-domain="orders"] [data-stat="tsq"]') == str(tsq_db)
    pg.wait_for_selector("#chart svg")
    for path, marker in [
        ("/commands", "table"),
        (f"/commands/orders/{seeded.xss}", "#audit"),
        ("/tsq", "#tsq-count"),
        ("/tsq/bulk?action=retry&domain=orders", "#bulk-count"),
        ("/batches", "table"),
        ("/processes", "table"),
        (f"/processes/orders/{seeded.process_id}", ".timeline"),
        ("/send", "#send"),
        ("/e2e", "#calculator"),
    ]:
        response = pg.goto(server + path)
        assert response is not None and response.status == 200, path
        pg.wait_for_selector(marker)
    # Data shows as text, never as markup.
    pg.goto(f"{server}/commands/orders/{seeded.xss}")
    assert XSS in pg.inner_text("#payload")
    assert XSS in pg.inner_text("#last-error")
    assert pg.evaluate("document.querySelectorAll('main script').length") == 0

    # A TSQ retry: set the operator, retry one row, compare with the database.
    pg.goto(server + "/tsq?domain=orders")
    assert pg.inner_text("#tsq-count") == str(len(seeded.tsq))
    pg.fill("#operator", "alice")
    pg.click("#operator-form button")
    pg.wait_for_selector("text=acting as alice")
    target = seeded.tsq[0]
    pg.click(f'tr[data-command-id="{target}"] button[data-action="retry"]')
    pg.wait_for_selector(f"text=retried {target}")
    [(status,)] = query(
        database_url, "SELECT status FROM commandbus.command WHERE command_id = %s", target
    )
    assert status == "PENDING"
    [(details,)] = query(
        database_url,
        "SELECT details_json FROM commandbus.audit WHERE command_id = %s"
        " AND event_type = 'OPERATOR_RETRY'",
        target,
    )
    assert details["operator"] == "alice"
    assert pg.inner_text("#tsq-count") == str(len(seeded.tsq) - 1)
    assert pg.locator(f'tr[data-command-id="{target}"]').count() == 0

    # Bulk generation of 10,000 with failures, worked by the in-process worker.
    pg.goto(server + "/e2e")
    pg.fill('input[name="fail_permanent_pct"]', "5")
    pg.fill('input[name="fail_transient_pct"]', "5")
    pg.fill('input[name="max_attempts"]', "1")
    pg.fill("#count", "10000")
    _until(lambda: pg.inner_text('[data-expected="1"]') == "~500")
    assert pg.inner_text('[data-final="tsq"]') == "~975"  # 5% + 5% of the other 95%
    pg.click("#generate")
    pg.wait_for_selector('#job [data-state="done"]', timeout=60_000)
    assert "sent 10,000 commands" in pg.inner_text("#job")
    assert _count(database_url, "SELECT count(*) FROM commandbus.command WHERE domain = 'e2e'") == (
        10_000
    )
    deadline = time.monotonic() + 60
    while (
        _count(
            database_url,
            "SELECT count(*) FROM commandbus.command WHERE domain = 'e2e'"
            " AND status IN ('COMPLETED', 'IN_TROUBLESHOOTING_QUEUE')",
        )
        < 10_000
    ):
        assert time.monotonic() < deadline, "the worker did not finish the 10,000 commands"
        time.sleep(0.2)
    failed = _count(
        database_url,
        "SELECT count(*) FROM commandbus.command WHERE domain = 'e2e' AND in_tsq",
    )
    assert 700 < failed < 1250  # ~975 expected
    execute(database_url, "ANALYZE commandbus.command")

    # The dashboard says what the database says.
    pg.goto(server + "/")
    card = '[data-domain="e2e"]'
    pg.wait_for_selector(card)
    _until(lambda: pg.inner_text(f'{card} [data-stat="tsq"]') == f"{failed:,}")
    assert pg.inner_text(f'{card} [data-count="IN_TROUBLESHOOTING_QUEUE"]') == f"{failed:,}"
    completed = pg.inner_text(f'{card} [data-count="COMPLETED"]')
    assert completed == f"≈ {10_000 - failed:,}"  # ANALYZE read every row: exact here
    assert pg.inner_text(f'{card} [data-stat="queue_depth"]') == "0"
    # The in-process worker names its connections as the engine's workers do.
    assert pg.locator('tr[data-worker="e2e"][data-connected="yes"]').count() == 1
    # The chart draws finished 10 s buckets: wait for the one holding the run.
    # The chart's peak is the run's rate: thousands a second, not the seed's few.
    _until(lambda: float(pg.get_attribute("#chart svg", "data-peak") or 0) > 100)
    _shot(pg, "dashboard.png", full_page=True)
    pg.goto(server + "/tsq?domain=e2e")
    assert pg.inner_text("#tsq-count") == f"{failed:,}"
    rows = pg.locator("tr[data-command-id]").count()
    assert rows == min(50, failed)
    _shot(pg, "tsq.png")
    pg.goto(server + "/commands?domain=e2e&status=IN_TROUBLESHOOTING_QUEUE")
    listed = re.findall(r'data-command-id="([0-9a-f-]+)"', pg.content())
    assert len(listed) == 50
    in_tsq = {
        str(r[0])
        for r in query(
            database_url,
            "SELECT command_id FROM commandbus.command"
            " WHERE command_id = ANY(%s::uuid[]) AND in_tsq",
            listed,
        )
    }
    assert in_tsq == set(listed)
