"""The README's "Process managers" example, exactly as written there: its code runs against a
real server and prints what its comments say."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from itest_helpers import fetch
from psycopg_pool import AsyncConnectionPool

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_saga() -> str:
    text = README.read_text()
    start = text.index("## Process managers")
    section = text[start : text.index("\n## ", start + 1)]
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", section, flags=re.S)
               if c.startswith("# saga.py")]  # fmt: skip
    return code


async def test_readme_saga_runs_as_written(
    pool: AsyncConnectionPool[Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """saga.py written to a file and imported, as a user's module would be."""
    path = tmp_path / "saga.py"
    path.write_text(readme_saga())
    spec = importlib.util.spec_from_file_location("readme_saga", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "readme_saga", module)
    spec.loader.exec_module(module)
    await module.run_orders(pool)
    assert capsys.readouterr().out.splitlines() == ["o1 COMPLETED None", "o2 COMPENSATED LIMIT"]
    steps = await fetch(
        pool,
        "SELECT p.state->>'order_id', a.step_name, a.reply_outcome FROM commandbus.process_audit a"
        " JOIN commandbus.process p USING (domain, process_id) ORDER BY a.id",
    )
    assert sorted(steps) == sorted([
        ("o1", "RESERVE", "SUCCESS"), ("o1", "CHARGE", "SUCCESS"),
        ("o2", "RESERVE", "SUCCESS"), ("o2", "CHARGE", "FAILED"), ("o2", "RELEASE", "SUCCESS"),
    ])  # fmt: skip
