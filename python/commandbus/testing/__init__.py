"""Test your handlers: a pytest plugin and :func:`drain_queue`.

In your ``conftest.py``::

    pytest_plugins = ["commandbus.testing"]

gives the fixtures ``commandbus_server_dsn`` (session: ``$DATABASE_URL`` or an embedded
PostgreSQL), ``commandbus_template`` (session: a database with PGMQ and the schema),
``commandbus_database_url`` (a fresh copy of it per test) and ``commandbus_pool`` (an open
``AsyncConnectionPool`` on that copy); see :mod:`commandbus.testing.plugin`.

:func:`drain_queue` works every queued command of a domain in-process until the queue is
idle and returns their outcomes. It needs no pytest: importing this package does not import
pytest (the plugin lives in :mod:`commandbus.testing.plugin`, which pytest loads through
``pytest_plugins`` below).

PYTEST_DONT_REWRITE
"""

from commandbus.testing._drain import drain_queue

# Loaded by pytest when a conftest names this package in its own `pytest_plugins`.
pytest_plugins = ["commandbus.testing.plugin"]

__all__ = ["drain_queue"]
