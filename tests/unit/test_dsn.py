"""The conninfo -> sqlx URL translation of the Rust engine's connection."""

from __future__ import annotations

import pytest

from commandbus._dsn import (
    KEEPALIVE_PARAMS,
    keepalive_kwargs,
    native_dsn,
    pool_conninfo,
    validate_call_timeout,
)
from commandbus.exceptions import ValidationError


@pytest.mark.parametrize(
    ("conninfo", "url"),
    [
        ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://postgres@127.0.0.1:5432/test"),
        ("host=db.example port=6432 dbname=app user=u password=p@ss sslmode=require",
         "postgresql://u:p%40ss@db.example:6432/app?sslmode=require"),
        ("host=/run/pg dbname=app user=u port=5433",
         "postgresql:///app?host=%2Frun%2Fpg&port=5433&user=u"),
        ("host=::1 dbname=app", "postgresql://[::1]/app"),
    ],
)  # fmt: skip
def test_native_dsn(conninfo: str, url: str) -> None:
    assert native_dsn(conninfo) == url


def test_pool_conninfo_accepts_str_and_sync_callable() -> None:
    class Pool:
        def __init__(self, conninfo: object) -> None:
            self.conninfo = conninfo

    assert pool_conninfo(Pool("dbname=x")) == "dbname=x"
    assert pool_conninfo(Pool(lambda: "dbname=y")) == "dbname=y"

    async def later() -> str:
        return "dbname=z"

    with pytest.raises(ValidationError, match="async callable"):
        pool_conninfo(Pool(later))
    with pytest.raises(ValidationError):
        pool_conninfo(object())


def test_keepalive_kwargs_fill_in_what_the_conninfo_does_not_set() -> None:
    assert keepalive_kwargs("host=db dbname=x") == KEEPALIVE_PARAMS
    own = keepalive_kwargs("postgresql://u@db/x?keepalives_idle=60&connect_timeout=3")
    assert "keepalives_idle" not in own and "connect_timeout" not in own
    assert own["tcp_user_timeout"] == "30000"


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "10", None, 2e6])
def test_call_timeout_must_be_positive_seconds(value: object) -> None:
    with pytest.raises(ValidationError) as exc:
        validate_call_timeout(value)
    assert exc.value.field == "call_timeout"


def test_call_timeout_accepts_numbers() -> None:
    assert validate_call_timeout(3) == 3.0
    assert validate_call_timeout(0.5) == 0.5


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u:p%40ss@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db?user=u&password=secret&sslmode=require",
         "postgresql://h/db?user=u&password=***&sslmode=require"),
        ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password = 'se cr\\'et' dbname=d", "host=h password = *** dbname=d"),
        ("postgresql://u:a:b@h1,h2/db", "postgresql://u:***@h1,h2/db"),
    ],
)  # fmt: skip
def test_redact_dsn(dsn: str, shown: str) -> None:
    from commandbus._dsn import redact_dsn

    assert redact_dsn(dsn) == shown


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:S3cr3t@[::1/db",
        "host=h user=u password=S3cr3t port",
        "host=h password='S3cr3t",
    ],
)
def test_a_dsn_that_cannot_be_parsed_is_a_validation_error_without_the_password(dsn: str) -> None:
    from commandbus._dsn import native_dsn
    from commandbus.embedded import database_dsn

    with pytest.raises(ValidationError) as info:
        native_dsn(dsn)
    assert info.value.field == "dsn"
    assert "S3cr3t" not in str(info.value) and info.value.__cause__ is None
    assert "***" in str(info.value)
    with pytest.raises(ValueError) as err:  # a ValidationError, or urlsplit's own ValueError
        database_dsn(dsn, "x")
    assert "S3cr3t" not in str(err.value) and err.value.__cause__ is None
