"""testcontainers serves where a Docker engine answers (never the only way to run)."""

from __future__ import annotations

import psycopg
import pytest

from commandbus.embedded import install_pgmq
from docker_probe import docker_answers


@pytest.mark.skipif(not docker_answers(), reason="no Docker engine answers on this machine")
def test_postgres_container_takes_pgmq() -> None:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16", driver=None) as container:
        url = container.get_connection_url()
        assert install_pgmq(url) in ("extension", "sql")
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT to_regclass('pgmq.meta') IS NOT NULL").fetchone()
        assert row == (True,)
