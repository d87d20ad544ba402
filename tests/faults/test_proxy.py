"""The fault proxy itself (tests/faults/proxy.py), against the suite's PostgreSQL."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import FaultProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]


@pytest.fixture
def proxy(database_url: str) -> Iterator[FaultProxy]:
    parts = urlsplit(database_url)
    if parts.hostname is None or parts.port is None:
        pytest.skip("the proxy needs a TCP server; the suite's server has no host:port")
    with FaultProxy(parts.hostname, parts.port) as p:
        yield p


def connect(proxy: FaultProxy, database_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(database_url), autocommit=True, connect_timeout=5)


def roundtrip(conn: psycopg.Connection[Any]) -> float:
    t0 = time.monotonic()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    return time.monotonic() - t0


def test_forwards_and_freezes_only_the_open_connections(
    proxy: FaultProxy, database_url: str
) -> None:
    old = connect(proxy, database_url)
    roundtrip(old)
    assert proxy.freeze() == 1
    assert proxy.connections == (1, 1)
    outcome: list[object] = []

    def query() -> None:
        try:
            outcome.append(old.execute("SELECT 1").fetchone())
        except psycopg.Error as exc:
            outcome.append(exc)

    thread = threading.Thread(target=query, daemon=True)
    thread.start()
    thread.join(1.5)
    assert thread.is_alive() and outcome == [], "a frozen connection must get no answer"
    with connect(proxy, database_url) as new:  # new connections pass
        roundtrip(new)
    assert proxy.reset() == 1
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.OperationalError), outcome
    old.close()


def test_latency_delays_every_packet_until_removed(proxy: FaultProxy, database_url: str) -> None:
    with connect(proxy, database_url) as conn:
        roundtrip(conn)
        proxy.add_latency(200)
        # the query and its answer are each forwarded 200 ms late
        assert roundtrip(conn) >= 0.4
        proxy.add_latency(0)
        assert roundtrip(conn) < 0.4
    with pytest.raises(ValueError, match="latency"):
        proxy.add_latency(-1)
