"""Every page and fragment of the console, against a seeded database (FastAPI TestClient)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from .conftest import XSS, Seeded, query


def test_dashboard_and_its_fragments(client: TestClient, seeded: Seeded, database_url: str) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert 'hx-get="/fragments/stats"' in page.text and "/static/htmx.min.js" in page.text
    stats = client.get("/fragments/stats")
    assert stats.status_code == 200
    assert 'data-domain="orders"' in stats.text
    [(tsq,)] = query(database_url, "SELECT count(*) FROM commandbus.command WHERE in_tsq")
    assert re.search(rf'data-stat="tsq"><a [^>]*>{tsq}</a>', stats.text)
    assert 'data-count="IN_TROUBLESHOOTING_QUEUE">' + str(tsq) in stats.text
    chart = client.get("/fragments/chart")
    assert chart.status_code == 200 and "<svg" in chart.text and "<polyline" in chart.text
    htmx = client.get("/static/htmx.min.js")
    assert htmx.status_code == 200 and "htmx" in htmx.text[:200]


def test_commands_list_filters_and_pages(client: TestClient, seeded: Seeded) -> None:
    page = client.get("/commands", params={"domain": "orders"})
    assert page.status_code == 200
    ids = re.findall(r'data-command-id="([0-9a-f-]+)"', page.text)
    assert len(ids) == 13
    tsq = client.get("/commands", params={"status": "IN_TROUBLESHOOTING_QUEUE"})
    assert sorted(re.findall(r'data-command-id="([0-9a-f-]+)"', tsq.text)) == sorted(
        str(i) for i in seeded.tsq
    )
    one = client.get("/commands", params={"command_id": str(seeded.completed[0])})
    assert re.findall(r'data-command-id="([0-9a-f-]+)"', one.text) == [str(seeded.completed[0])]
    bad = client.get("/commands", params={"command_id": "nope"})
    assert bad.status_code == 200 and "command_id" in bad.text and "not a UUID" in bad.text
    bad = client.get("/commands", params={"created_after": "yesterday"})
    assert "created_after" in bad.text
    # Keyset paging: page one's cursor leads to page two, no row twice.
    from commandbus.console import pages

    old = pages.PAGE_SIZE
    pages.PAGE_SIZE = 5
    try:
        first = client.get("/commands")
        cursor = re.search(r'id="next-page"[^>]*href="([^"]+)"', first.text)
        assert cursor is not None
        second = client.get(cursor.group(1).replace("&amp;", "&"))
        a = re.findall(r'data-command-id="([0-9a-f-]+)"', first.text)
        b = re.findall(r'data-command-id="([0-9a-f-]+)"', second.text)
        assert len(a) == 5 and len(b) == 5 and not set(a) & set(b)
    finally:
        pages.PAGE_SIZE = old


def test_command_detail_escapes_data(client: TestClient, seeded: Seeded) -> None:
    page = client.get(f"/commands/orders/{seeded.xss}")
    assert page.status_code == 200
    assert XSS not in page.text  # neither the payload nor the error message is HTML
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page.text
    assert 'id="payload"' in page.text and "note" in page.text
    assert "MOVED_TO_TSQ" in page.text and "SENT" in page.text  # the audit timeline
    assert 'action="/tsq/retry"' in page.text
    done = client.get(f"/commands/orders/{seeded.completed[0]}")
    assert '"charged"' in done.text.replace("&#34;", '"') and 'action="/tsq/retry"' not in done.text
    assert client.get("/commands/orders/00000000-0000-0000-0000-000000000000").status_code == 404
    assert client.get("/commands/orders/not-a-uuid").status_code == 400


def test_tsq_page_and_bulk_confirmation(client: TestClient, seeded: Seeded) -> None:
    page = client.get("/tsq")
    assert page.status_code == 200
    listed = re.findall(r'<tr data-command-id="([0-9a-f-]+)"', page.text)
    assert sorted(listed) == sorted(str(i) for i in seeded.tsq)
    assert XSS not in page.text and "&lt;script&gt;" in page.text
    assert 'id="bulk-retry"' in page.text
    confirm = client.get("/tsq/bulk", params={"action": "cancel", "domain": "orders"})
    assert confirm.status_code == 200
    assert f'id="bulk-count">{len(seeded.tsq)}<' in confirm.text
    typed = client.get(
        "/tsq/bulk", params={"action": "retry", "domain": "orders", "command_type": "Nope"}
    )
    assert 'id="bulk-count">0<' in typed.text
    assert client.get("/tsq/bulk", params={"action": "drop", "domain": "orders"}).status_code == 400


def test_batches_processes_send_and_e2e_pages(client: TestClient, seeded: Seeded) -> None:
    assert client.get("/batches").status_code == 200
    processes = client.get("/processes")
    assert processes.status_code == 200 and str(seeded.process_id) in processes.text
    detail = client.get(f"/processes/orders/{seeded.process_id}")
    assert detail.status_code == 200
    assert "reserve" in detail.text and "Reserve" in detail.text and XSS not in detail.text
    assert client.get(f"/processes/orders/{seeded.completed[0]}").status_code == 404
    assert client.get("/processes", params={"status": "BOGUS"}).status_code == 400
    send = client.get("/send")
    assert send.status_code == 200 and 'name="csrf_token"' in send.text
    e2e = client.get("/e2e")
    assert e2e.status_code == 200 and 'hx-get="/e2e/calculator"' in e2e.text


def test_calculator_fragment(client: TestClient) -> None:
    calc = client.get(
        "/e2e/calculator",
        params={"fail_permanent_pct": "2", "fail_transient_pct": "8", "count": "10000"},
    )
    assert calc.status_code == 200
    assert 'data-expected="1">~200<' in calc.text
    assert 'data-expected="2">~784<' in calc.text
    assert 'data-expected="4">~9,016<' in calc.text
    bad = client.get("/e2e/calculator", params={"fail_permanent_pct": "200"})
    assert "fail_permanent_pct" in bad.text and 'role="alert"' in bad.text
