"""`rcmd` commands against a real database (typer's CliRunner, in this process): what each
prints, what it changes in the database, and its bad-input paths (one `error:` line, exit 1)."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

from psycopg_pool import AsyncConnectionPool

from commandbus import BatchCommand, CommandBus, CommandStatus, SendRequest
from commandbus.cli._common import default_operator
from commandbus.embedded import create_database, drop_database
from commandbus.testing import drain_queue

from .cli_handlers import registry
from .cli_helpers import Rcmd, completed_events, on_db


def one_error(result: Any, needle: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def as_json(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def _statuses(pool: AsyncConnectionPool[Any], domain: str, ids: list[UUID]) -> list[Any]:
    bus = CommandBus(pool)
    try:
        return [(await bus.get_command(domain, i)) for i in ids]
    finally:
        await bus.close()


async def _age_commands(pool: AsyncConnectionPool[Any], ids: list[UUID]) -> None:
    """Make commands look created and last updated two days ago (test-only SQL)."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE commandbus.command SET created_at = now() - interval '2 days',"
            " updated_at = now() - interval '2 days' WHERE command_id = ANY(%s)",
            (ids,),
        )


def _send_and_work(database_url: str, data: list[dict[str, Any]]) -> list[UUID]:
    """Send `clitest.Work` commands with `data` and work them off in-process (fail: TSQ)."""
    ids = [uuid4() for _ in data]

    async def go(pool: AsyncConnectionPool[Any]) -> None:
        bus = CommandBus(pool)
        await bus.send_batch(
            [SendRequest("clitest", "Work", i, d) for i, d in zip(ids, data, strict=True)]
        )
        await bus.close()
        await drain_queue(pool, "clitest", registry)

    on_db(database_url, go)
    return ids


# -- setup and check ------------------------------------------------------------------------


def test_setup_then_check_on_an_empty_database(rcmd: Rcmd, pg_admin_dsn: str) -> None:
    url = create_database(pg_admin_dsn, f"rcmd_t_{uuid4().hex[:12]}")
    env = {"DATABASE_URL": url}
    try:
        before = rcmd("check", "--json", env=env)
        assert before.exit_code == 1
        checks = {c["check"]: c for c in json.loads(before.stdout)["checks"]}
        assert checks["connection"]["status"] == "ok"
        assert checks["schema"]["status"] == "FAIL" and "rcmd setup" in checks["schema"]["detail"]
        one_error(rcmd("tsq", "list", env=env), "schema is not installed")

        first = rcmd("setup", env=env)
        assert first.exit_code == 0 and "created" in first.stdout
        again = rcmd("setup", env=env)
        assert again.exit_code == 0 and "up to date" in again.stdout

        after = as_json(rcmd("check", "--json", env=env))
        assert after["ok"] is True
        assert {c["check"]: c["status"] for c in after["checks"]} == {
            "connection": "ok", "server": "ok", "pgmq": "ok", "schema": "ok", "queues": "ok"
        }  # fmt: skip
        assert rcmd("check", env=env).exit_code == 0
    finally:
        drop_database(pg_admin_dsn, url.rsplit("/", 1)[1])


def test_a_database_that_does_not_answer(rcmd: Rcmd) -> None:
    for args in (["check"], ["setup"], ["tsq", "list"], ["stats"], ["send", "d", "T"]):
        result = rcmd(*args, "--dsn", "postgresql://nobody@127.0.0.1:1/nothing")
        one_error(result, "cannot connect to postgresql://nobody@127.0.0.1:1/nothing")
    one_error(rcmd("check", "--dsn", "not a dsn at all"), "cannot connect to")
    hidden = rcmd("check", "--dsn", "postgresql://u:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in hidden.output and "u:***@" in hidden.stderr


# -- send -----------------------------------------------------------------------------------


def test_send_and_show(rcmd: Rcmd, database_url: str) -> None:
    one_error(rcmd("send", "clitest", "Work", "--data", '{"a": 1}'), "unknown domain 'clitest'")
    sent = as_json(
        rcmd(
            "send",
            "clitest",
            "Work",
            "--data",
            '{"a": 1}',
            "--new-domain",
            "--json",
            "--max-attempts",
            "5",
        )
    )
    cid = UUID(sent["command_id"])
    assert sent["msg_id"] >= 1
    [meta] = on_db(database_url, lambda pool: _statuses(pool, "clitest", [cid]))
    assert meta.status is CommandStatus.PENDING and meta.max_attempts == 5

    # the domain is known now; a given id is kept, a repeated one refused
    own = uuid4()
    out = rcmd("send", "clitest", "Work", "--id", str(own))
    assert out.exit_code == 0 and str(own) in out.stdout
    one_error(rcmd("send", "clitest", "Work", "--id", str(own)), str(own))
    one_error(rcmd("send", "clitest", "Work", "--data", "[1, 2]"), "expected a JSON object")
    one_error(rcmd("send", "clitest", "Work", "--data", "{oops"), "malformed JSON")
    one_error(rcmd("send", "bad domain!", "Work", "--new-domain"), "invalid domain")

    shown = as_json(rcmd("commands", "show", str(cid), "--json", "--audit"))
    assert shown["command"]["status"] == "PENDING"
    assert [e["event_type"] for e in shown["audit"]] == ["SENT"]
    text = rcmd("commands", "show", str(cid))
    assert text.exit_code == 0 and "PENDING" in text.stdout and "clitest" in text.stdout
    one_error(rcmd("commands", "show", str(uuid4())), "in any domain")
    one_error(rcmd("commands", "show", str(cid), "--domain", "nope"), "unknown domain 'nope'")


def test_send_bulk(rcmd: Rcmd, database_url: str) -> None:
    one_error(rcmd("send-bulk", "clitest", "Work", "--count", "3"), "unknown domain")
    result = rcmd("send-bulk", "clitest", "Work", "--count", "2500", "--data", '{"x": 1}',
                  "--new-domain", "--chunk-size", "1000")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sent 2500 clitest.Work commands" in result.stdout
    assert "2500/2500" in result.stderr  # the progress bar's last state
    page = as_json(rcmd("commands", "list", "--domain", "clitest", "--limit", "1000", "--json"))
    assert len(page["items"]) == 1000 and page["next_cursor"]
    assert {c["status"] for c in page["items"]} == {"PENDING"}
    rest = as_json(rcmd("commands", "list", "--domain", "clitest", "--limit", "1000",
                        "--cursor", page["next_cursor"], "--json"))  # fmt: skip
    ids = {c["command_id"] for c in page["items"]} | {c["command_id"] for c in rest["items"]}
    assert len(ids) == 2000
    one_error(rcmd("send-bulk", "clitest", "Work", "-n", "2", "--data", "{"), "malformed JSON")


# -- the troubleshooting queue --------------------------------------------------------------


def test_tsq_list_show_retry_cancel_complete(rcmd: Rcmd, database_url: str) -> None:
    ok, *broken = _send_and_work(database_url, [{}] + [{"fail": True}] * 5)
    listed = as_json(rcmd("tsq", "list", "--json"))
    assert listed["total"] == 5
    assert {i["command_id"] for i in listed["items"]} == {str(b) for b in broken}
    assert all(i["last_error_code"] == "BROKEN" for i in listed["items"])
    table = rcmd("tsq", "list", "--domain", "clitest")
    assert table.exit_code == 0 and str(broken[0]) in table.stdout and "BROKEN" in table.stdout
    one_error(rcmd("tsq", "list", "--domain", "nope"), "unknown domain 'nope'")

    shown = as_json(rcmd("tsq", "show", str(broken[0]), "--json"))
    assert shown["payload"]["data"] == {"fail": True}
    assert [e["event_type"] for e in shown["audit"]][-1] == "MOVED_TO_TSQ"

    # single actions; the operator defaults to the OS user
    assert rcmd("tsq", "retry", str(broken[0])).exit_code == 0
    assert (
        rcmd("tsq", "cancel", str(broken[1]), "--reason", "dup", "--operator", "alice").exit_code
        == 0
    )
    done = rcmd("tsq", "complete", str(broken[2]), "--result", '{"manual": true}')
    assert done.exit_code == 0
    # acting twice on one command: the second is refused, exit 1
    again = rcmd("tsq", "cancel", str(broken[1]))
    assert again.exit_code == 1 and str(broken[1]) in again.stderr
    one_error(rcmd("tsq", "complete", str(broken[3]), "--result", "{x"), "malformed JSON")

    metas = on_db(database_url, lambda pool: _statuses(pool, "clitest", broken[:3]))
    assert [m.status for m in metas] == [
        CommandStatus.PENDING, CommandStatus.CANCELED, CommandStatus.COMPLETED
    ]  # fmt: skip
    assert metas[2].result == {"manual": True}
    audit = as_json(rcmd("audit", str(broken[0]), "--json"))
    retried = [e for e in audit if e["event_type"] == "OPERATOR_RETRY"]
    assert retried and retried[0]["details"]["operator"] == default_operator()
    cancel = as_json(rcmd("audit", str(broken[1]), "--json"))
    assert [e["details"]["operator"] for e in cancel if e["event_type"] == "OPERATOR_CANCEL"] == [
        "alice"
    ]
    one_error(rcmd("audit", str(uuid4())), "no audit events")
    assert ok not in broken

    # --all: a count and a question; "n" does nothing
    declined = rcmd("tsq", "cancel", "--all", "--domain", "clitest", input="n\n")
    assert declined.exit_code == 1 and "2 TSQ commands" in declined.stderr
    assert "nothing done" in declined.stderr
    assert as_json(rcmd("tsq", "list", "--json"))["total"] == 2
    # no answer at all (stdin closed) does nothing either
    assert rcmd("tsq", "retry", "--all", input="").exit_code == 1
    # a filter that matches nothing
    assert (
        "0 commands"
        in rcmd("tsq", "retry", "--all", "--domain", "clitest", "--type", "Other").stdout
    )
    confirmed = rcmd(
        "tsq", "complete", "--all", "--domain", "clitest", "--type", "Work", input="y\n"
    )
    assert confirmed.exit_code == 0 and "completed: 2 commands" in confirmed.stdout
    assert as_json(rcmd("tsq", "list", "--json"))["total"] == 0


def test_tsq_bulk_retry_and_cancel_with_yes(rcmd: Rcmd, database_url: str) -> None:
    _send_and_work(database_url, [{"fail": True}] * 4)
    out = as_json(rcmd("tsq", "retry", "--all", "--yes", "--json"))
    assert out == {"done": 4, "by_domain": {"clitest": 4}}
    _send_and_work(database_url, [{"fail": True}] * 2)  # the 4 retried fail again: 6 in the TSQ
    out = as_json(rcmd("tsq", "cancel", "--all", "--domain", "clitest", "--yes", "--json"))
    assert out["done"] == 6
    assert as_json(rcmd("tsq", "list", "--json"))["total"] == 0


# -- commands, batches, stats, prune --------------------------------------------------------


def test_commands_list_filters(rcmd: Rcmd, database_url: str) -> None:
    good = _send_and_work(database_url, [{}] * 3)
    bad = _send_and_work(database_url, [{"fail": True}])
    done = as_json(rcmd("commands", "list", "--status", "completed", "--json"))
    assert {c["command_id"] for c in done["items"]} == {str(g) for g in good}
    tsq = as_json(rcmd("commands", "list", "--status", "IN_TROUBLESHOOTING_QUEUE", "--json"))
    assert [c["command_id"] for c in tsq["items"]] == [str(bad[0])]
    recent = as_json(rcmd("commands", "list", "--created-after", "1h", "--type", "Work", "--json"))
    assert len(recent["items"]) == 4
    assert as_json(rcmd("commands", "list", "--created-before", "1h", "--json"))["items"] == []
    table = rcmd("commands", "list")
    assert table.exit_code == 0 and str(good[0]) in table.stdout
    one_error(rcmd("commands", "list", "--status", "DONE"), "invalid --status 'DONE'")
    one_error(rcmd("commands", "list", "--created-after", "yesterday"), "invalid --created-after")
    one_error(rcmd("commands", "list", "--domain", "nope"), "unknown domain 'nope'")
    one_error(rcmd("commands", "list", "--cursor", "garbage"), "cursor")


def test_batches(rcmd: Rcmd, database_url: str) -> None:
    async def make(pool: AsyncConnectionPool[Any]) -> UUID:
        bus = CommandBus(pool)
        result = await bus.create_batch(
            "clitest",
            [BatchCommand("Work", uuid4(), {}), BatchCommand("Work", uuid4(), {"fail": True})],
            name="nightly",
        )
        await bus.close()
        await drain_queue(pool, "clitest", registry)
        return result.batch_id

    bid = on_db(database_url, make)
    listed = as_json(rcmd("batches", "list", "--domain", "clitest", "--json"))
    assert [b["batch_id"] for b in listed] == [str(bid)]
    assert listed[0]["completed_count"] == 1 and listed[0]["in_troubleshooting_count"] == 1
    waiting = as_json(
        rcmd("batches", "list", "--domain", "clitest", "--waiting-for-operator", "--json")
    )
    assert [b["batch_id"] for b in waiting] == [str(bid)]
    shown = as_json(rcmd("batches", "show", str(bid), "--domain", "clitest", "--json"))
    assert shown["waiting_for_operator"] is True and len(shown["commands"]) == 2
    text = rcmd("batches", "show", str(bid), "--domain", "clitest")
    assert text.exit_code == 0 and "nightly" in text.stdout and "IN_PROGRESS" in text.stdout
    assert "nightly" in rcmd("batches", "list", "--domain", "clitest").stdout
    one_error(rcmd("batches", "show", str(uuid4()), "--domain", "clitest"), "no batch")
    one_error(rcmd("batches", "list", "--domain", "nope"), "unknown domain 'nope'")


def test_stats(rcmd: Rcmd, database_url: str) -> None:
    _send_and_work(database_url, [{}] * 3 + [{"fail": True}] * 2)
    on_db(database_url, lambda pool: CommandBus(pool).send("clitest", "Work", uuid4(), {}))
    [row] = as_json(rcmd("stats", "--json"))
    assert row["domain"] == "clitest"
    assert row["tsq_size"] == 2 and row["queue_depth"] == 1
    assert row["counts_by_status"]["PENDING"] == 1
    assert row["oldest_waiting_seconds"] is not None and row["workers"] == 0
    assert row["completed_per_s"] > 0  # 3 completed within the rate window
    table = rcmd("stats", "--domain", "clitest")
    assert table.exit_code == 0 and "clitest" in table.stdout and "depth" in table.stdout
    one_error(rcmd("stats", "--domain", "nope"), "unknown domain 'nope'")
    one_error(rcmd("stats", "--watch", "--json"), "--watch and --json")


def test_prune(rcmd: Rcmd, database_url: str) -> None:
    done = _send_and_work(database_url, [{}] * 3)
    stuck = _send_and_work(database_url, [{"fail": True}])
    kept = as_json(rcmd("prune", "--older-than", "1d", "--json"))
    assert kept["commands"] == 0
    # Commands and audit rows go by whole UTC days: nothing of today's goes yet.
    today = as_json(rcmd("prune", "--older-than", "0s", "--domain", "clitest", "--json"))
    assert today["commands"] == 0  # (yesterday's empty partitions may go)
    on_db(database_url, lambda pool: _age_commands(pool, [*done, *stuck]))
    pruned = as_json(rcmd("prune", "--older-than", "0s", "--domain", "clitest", "--json"))
    # (two days old: in the default partition, pruned row by row; the audit rows stay in
    # today's partition)
    assert pruned["commands"] == 3 and pruned["audit_events"] == 0
    assert completed_events(database_url, done) == dict.fromkeys(done, 1)
    metas = on_db(database_url, lambda pool: _statuses(pool, "clitest", [*done, *stuck]))
    assert metas[:3] == [None, None, None]
    assert metas[3] is not None  # the TSQ is never pruned
    assert "pruned 0 commands" in rcmd("prune", "--older-than", "30d").stdout
    one_error(rcmd("prune", "--older-than", "30 days"), "invalid --older-than '30 days'")
    one_error(rcmd("prune", "--older-than", "1d", "--domain", "nope"), "unknown domain 'nope'")


def test_demo_on_the_test_database(rcmd: Rcmd) -> None:
    """`rcmd demo` as `python -m commandbus demo` was: the report, the JSON summary, exit 0."""
    result = rcmd("demo", "--commands", "300", "--concurrency", "32")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["commands"] == 300
    assert summary["statuses"] == {"COMPLETED": 300} and summary["audit_completed"] == 300
    assert "sent   300 commands in" in result.stdout and "worked 300 commands in" in result.stdout
