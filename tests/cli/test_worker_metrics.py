"""`rcmd worker --processes 2 --metrics-port P`: the supervisor serves the two children's
metrics (prometheus multiprocess mode), checked against the database."""

from __future__ import annotations

import re
import signal
import socket
import time
import urllib.request

from .cli_helpers import Lines, Spawn, send, statuses, wait_all


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value of every rcmd_ sample."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("rcmd_"):
            name, value = line.rsplit(" ", 1)
            samples[re.sub(r"\s", "", name)] = float(value)
    return samples


def _value(samples: dict[str, float], name: str, **labels: str) -> float:
    for key, value in samples.items():
        if key.split("{", 1)[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            return value
    raise AssertionError(f"no {name} {labels} in {sorted(samples)}")


def test_two_processes_serve_metrics_that_match_the_database(
    database_url: str, spawn: Spawn
) -> None:
    port = _free_port()
    sup = spawn(
        "worker", "cli_handlers:registry", "--processes", "2", "--concurrency", "4",
        "--metrics-port", str(port), "--poll-interval", "0.2",
    )  # fmt: skip
    log = Lines(sup)
    log.wait_for(r"clitest starting", count=2)
    ok = send(database_url, 40, {})
    broken = send(database_url, 6, {"fail": True})
    wait_all(database_url, ok, "COMPLETED")
    wait_all(database_url, broken, "IN_TROUBLESHOOTING_QUEUE")
    deadline = time.monotonic() + 10
    while True:  # the children publish what their engines counted about once a second
        samples = _scrape(port)
        try:
            done = _value(samples, "rcmd_commands_completed_total", domain="clitest")
        except AssertionError:  # no outcome published yet
            done = 0
        if done >= 40 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    in_db = statuses(database_url, ok + broken)
    assert done == sum(s == "COMPLETED" for s in in_db.values()) == 40
    assert _value(samples, "rcmd_commands_tsq_total", domain="clitest") == 6
    assert _value(samples, "rcmd_tsq_commands", domain="clitest") == 6  # read at scrape time
    assert _value(samples, "rcmd_queue_messages", domain="clitest") == 0
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0, log.text()


def test_a_metrics_port_in_use_is_one_line(spawn: Spawn) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for processes in ("1", "2"):
            proc = spawn("worker", "cli_handlers:registry", "--metrics-port", port,
                         "--processes", processes)  # fmt: skip
            _out, err = proc.communicate(timeout=60)
            assert proc.returncode == 1
            assert err.strip() == f"error: cannot serve metrics on 127.0.0.1:{port}: " \
                "Address already in use"  # fmt: skip
