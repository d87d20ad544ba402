"""The native runtime's worker threads: one by default, `RCMD_TOKIO_THREADS` to change it, and a
typed error for a bad value. Each case runs in a fresh interpreter (the runtime is built once
per process, on first use)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os
import time
from commandbus import _native
from commandbus.exceptions import ValidationError
try:
    _native.NativeBus("postgresql://postgres@127.0.0.1:1/none", 1)  # lazy: never connects
except ValidationError as exc:
    print("ValidationError", exc.field, repr(exc.value))
else:
    def count():
        names = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        return names.count("rcmd-tokio")
    deadline = time.monotonic() + 5  # a new thread names itself once it runs
    while count() < int(os.environ.get("RCMD_TOKIO_THREADS", "1")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    print("threads", count())
"""


def _probe(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RCMD_TOKIO_THREADS"}
    if value is not None:
        env["RCMD_TOKIO_THREADS"] = value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names come from /proc")
@pytest.mark.parametrize(("value", "expected"), [(None, "threads 1"), ("3", "threads 3")])
def test_runtime_threads(value: str | None, expected: str) -> None:
    assert _probe(value) == expected


@pytest.mark.parametrize("value", ["0", "65", "two", ""])
def test_a_bad_thread_count_is_a_validation_error_naming_the_value(value: str) -> None:
    assert _probe(value) == f"ValidationError RCMD_TOKIO_THREADS {value!r}"
