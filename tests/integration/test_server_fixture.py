"""The database fixtures give each test a copy with PGMQ and the commandbus schema."""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row


def test_pgmq_is_installed(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SELECT pgmq.create('t_q')")
        sent = conn.execute(
            "SELECT * FROM pgmq.send('t_q', %s::jsonb)", ('{"hello": "world"}',)
        ).fetchone()
        assert sent is not None
        rows = conn.execute("SELECT * FROM pgmq.read('t_q', 30, 10)").fetchall()
    assert len(rows) == 1
    assert rows[0]["msg_id"] == sent["send"]
    assert rows[0]["message"] == {"hello": "world"}
    assert rows[0]["read_ct"] == 1


def test_commandbus_schema_exists(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = 'commandbus'"
        ).fetchone()
    assert row == (1,)
