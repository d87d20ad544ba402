"""The commandbus.testing plugin as users use it: small test projects run with pytester, among
them the README's "Testing your handlers" example exactly as written there.

In-process runs share this session's server (its DSN passed as DATABASE_URL); one run starts
its own embedded server, one runs in a fresh interpreter as a user's would."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[2] / "README.md"

#: a user's pytest settings as strict as ours: any warning (an assertion-rewrite warning about
#: the plugin...) fails the run (pytest-asyncio itself warns while its fixture loop scope is unset)
STRICT_INI = "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"


def readme_example() -> dict[str, str]:
    """The files of the README's "Testing your handlers" section: each ```python block whose
    first line is a `# name.py` comment, by name."""
    text = README.read_text()
    start = text.index("## Testing your handlers")
    section = text[start : text.index("\n## ", start + 1)]
    files = {}
    for code in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        first = code.splitlines()[0]
        match = re.fullmatch(r"# (\w+)\.py", first)
        if match:
            files[match.group(1)] = code
    return files


def test_the_readme_has_the_example() -> None:
    files = readme_example()
    assert set(files) == {"conftest", "test_orders"}
    assert 'pytest_plugins = ["commandbus.testing"]' in files["conftest"]


def test_readme_example_runs(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pg_admin_dsn: str
) -> None:
    """The README example, as written, in pytest-asyncio's default (strict) mode: one test
    with a success, a retried transient failure, a permanent failure and a business rule."""
    monkeypatch.setenv("DATABASE_URL", pg_admin_dsn)
    pytester.makeini(STRICT_INI)
    pytester.makepyfile(**readme_example())
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["database: DATABASE_URL=*1 per-test databases*"])


USER_TESTS = '''
import psycopg
from uuid import uuid4

from commandbus import CommandBus, CommandStatus, HandlerRegistry
from commandbus.testing import drain_queue

registry = HandlerRegistry()


@registry.handler("orders", "Ship")
async def ship(cmd, ctx):
    if cmd.data["n"] == 0:  # the first one orders the next one, in the same domain
        await CommandBus(ctx_pool[0]).send("orders", "Ship", uuid4(), {"n": 1})
    return {"shipped": cmd.data["n"]}


ctx_pool = []


async def test_drain_follows_commands_sent_by_handlers(commandbus_pool):
    ctx_pool.append(commandbus_pool)
    first = uuid4()
    await CommandBus(commandbus_pool).send("orders", "Ship", first, {"n": 0})
    outcomes = await drain_queue(commandbus_pool, "orders", registry)
    assert [m.result for m in outcomes] == [{"shipped": 0}, {"shipped": 1}]
    assert outcomes[0].command_id == first
    assert {m.status for m in outcomes} == {CommandStatus.COMPLETED}


async def test_each_test_gets_its_own_database(commandbus_pool):
    """What the test above sent is not here."""
    assert await CommandBus(commandbus_pool).query_commands(domain="orders") == []


def test_the_template_has_the_schema(commandbus_database_url, commandbus_template):
    with psycopg.connect(commandbus_database_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname IN ('commandbus', 'pgmq')"
        ).fetchone()[0]
    assert tables > 3
    assert commandbus_template.startswith("rcmd_template_")
'''


def test_auto_mode_with_an_embedded_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DATABASE_URL: the plugin starts an embedded server for the run (and stops it);
    asyncio_mode = auto, as in this project; each test gets its own copy of the template."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    pytester.makeini(STRICT_INI + "asyncio_mode = auto\n")
    pytester.makeconftest('pytest_plugins = ["commandbus.testing"]\n')
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["database: embedded PostgreSQL at *; started in *; template ready in *"
         "; 3 per-test databases*"]
    )  # fmt: skip


def test_a_user_can_bring_their_own_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pg_admin_dsn: str
) -> None:
    """Overriding commandbus_server_dsn (how a testcontainers user would plug in)."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("MY_SERVER", pg_admin_dsn)
    pytester.makeini(STRICT_INI + "asyncio_mode = auto\n")
    pytester.makeconftest(
        "import os\nimport pytest\n\n"
        'pytest_plugins = ["commandbus.testing"]\n\n\n'
        '@pytest.fixture(scope="session")\n'
        "def commandbus_server_dsn():\n"
        '    return os.environ["MY_SERVER"]\n'
    )
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["database: PostgreSQL at *; template ready in *"])


def test_in_a_fresh_interpreter(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pg_admin_dsn: str
) -> None:
    """A user's run: nothing of commandbus imported before the conftest, the plugin found by
    name. The conftest imports commandbus.testing before naming it: no "already imported so
    cannot be rewritten" warning (an error under filterwarnings = error)."""
    monkeypatch.setenv("DATABASE_URL", pg_admin_dsn)
    pytester.makeini(STRICT_INI + "asyncio_mode = auto\n")
    pytester.makeconftest(
        "from commandbus.testing import drain_queue  # noqa: F401\n\n"
        'pytest_plugins = ["commandbus.testing"]\n'
    )
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(timeout=120)
    result.assert_outcomes(passed=3)


def test_the_fixtures_are_opt_in(pytester: pytest.Pytester) -> None:
    """Without pytest_plugins = ["commandbus.testing"] there are no commandbus fixtures."""
    pytester.makeini(STRICT_INI)
    pytester.makepyfile(test_user="def test_x(commandbus_pool):\n    pass\n")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'commandbus_pool' not found*"])
