"""PGMQ client: the predecessor's `PgmqClient` API over the SQL of `sql/statements/pgmq_*.sql`.

Results are read by column name (PGMQ 1.13's `read` returns `msg_id, read_ct, enqueued_at,
last_read_at, vt, message, headers`; older versions lack some of these: the statements select
only the columns used). Every method takes an optional `conn=` to run inside the caller's
transaction; without it a connection of the pool is used (and committed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncRawCursor
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from commandbus import _sql
from commandbus._errors import map_psycopg_error
from commandbus._validation import encode_json, validate_queue_name
from commandbus.exceptions import CommandBusError, DatabaseError, ValidationError

logger = logging.getLogger(__name__)

#: Prefix of the NOTIFY channel of a queue: `pgmq_notify_<queue_name>` (the predecessor's name).
PGMQ_NOTIFY_CHANNEL = "pgmq_notify"

# No size limit of its own: PGMQ stores what it is given (the bus enforces its payload limit).
_NO_LIMIT = 1 << 62


@dataclass
class PgmqMessage:
    """A message read from a PGMQ queue.

    Attributes:
        msg_id: Unique message ID (per queue).
        read_count: How many times the message has been read.
        enqueued_at: When the message was enqueued (text of the timestamp).
        vt: Visibility timeout: when the message becomes visible again (text).
        message: The message payload.
    """

    msg_id: int
    read_count: int
    enqueued_at: str
    vt: str
    message: dict[str, Any]


def notify_channel(queue_name: str) -> str:
    """The NOTIFY channel of a queue (`pgmq_notify_<queue_name>`)."""
    return f"{PGMQ_NOTIFY_CHANNEL}_{queue_name}"


def map_queue_error(err: psycopg.Error, queue_name: str) -> CommandBusError:
    """Map a driver error of a queue operation; a missing queue table gets a clear message."""
    if err.sqlstate == "42P01" and f"q_{queue_name}" in str(err):
        return DatabaseError(
            f"PGMQ queue {queue_name!r} does not exist (create_queue() first)",
            err.sqlstate,
            queue_name,
        )
    return map_psycopg_error(err)


def _as_message(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    return {"value": value}


def _to_message(row: dict[str, Any]) -> PgmqMessage:
    return PgmqMessage(
        msg_id=int(row["msg_id"]),
        read_count=int(row["read_ct"]),
        enqueued_at=str(row["enqueued_at"]),
        vt=str(row["vt"]),
        message=_as_message(row["message"]),
    )


def _check_seconds(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(name, value, "must be an integer >= 0 (seconds)")
    return value


class PgmqClient:
    """Client for PGMQ queues (create, send, read, delete, archive, set_vt, notify).

    Example:
        pgmq = PgmqClient(pool)
        msg_id = await pgmq.send("orders__replies", {"hello": "world"})
        [msg] = await pgmq.read("orders__replies", visibility_timeout=30)
        await pgmq.delete("orders__replies", msg.msg_id)
    """

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        """Args:
        pool: the psycopg async pool used when no `conn=` is given.
        """
        self._pool = pool

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        return self._pool

    async def _run(
        self,
        name: str,
        params: Sequence[Any],
        queue_name: str,
        conn: AsyncConnection[Any] | None,
    ) -> list[dict[str, Any]]:
        """Run statement `name` on `conn` (or a pool connection) and return its rows by name."""
        try:
            if conn is not None:
                return await _fetch(conn, name, params)
            async with self._pool.connection() as acquired:
                return await _fetch(acquired, name, params)
        except psycopg.Error as err:
            raise map_queue_error(err, queue_name) from err

    async def create_queue(self, queue_name: str, conn: AsyncConnection[Any] | None = None) -> None:
        """Create a queue if it does not exist (idempotent, safe under concurrent calls)."""
        validate_queue_name(queue_name, field="queue_name")
        rows = await self._run("ensure_queue", [queue_name], queue_name, conn)
        if rows and rows[0]["created"]:
            logger.debug("created queue %s", queue_name)

    async def send(
        self,
        queue_name: str,
        message: dict[str, Any],
        delay: int = 0,
        conn: AsyncConnection[Any] | None = None,
    ) -> int:
        """Send one message (visible after `delay` seconds) and NOTIFY `pgmq_notify_<queue>`.

        Returns the message ID. The notification is delivered when the transaction commits.
        """
        validate_queue_name(queue_name, field="queue_name")
        text = encode_json(message, "message", _NO_LIMIT)
        params = [queue_name, text, _check_seconds("delay", delay), notify_channel(queue_name)]
        rows = await self._run("pgmq_send", params, queue_name, conn)
        msg_id = int(rows[0]["msg_id"])
        logger.debug("sent message %s to %s", msg_id, queue_name)
        return msg_id

    async def send_batch(
        self,
        queue_name: str,
        messages: list[dict[str, Any]],
        delay: int = 0,
        conn: AsyncConnection[Any] | None = None,
    ) -> list[int]:
        """Send many messages in one call; returns their IDs in order.

        Does NOT notify (as the predecessor): call `notify()` when listeners must wake up.
        """
        validate_queue_name(queue_name, field="queue_name")
        _check_seconds("delay", delay)
        if not messages:
            return []
        texts = [encode_json(m, "message", _NO_LIMIT) for m in messages]
        rows = await self._run("pgmq_send_batch", [queue_name, texts, delay], queue_name, conn)
        return [int(r["msg_id"]) for r in rows]

    async def notify(self, queue_name: str, conn: AsyncConnection[Any] | None = None) -> None:
        """NOTIFY `pgmq_notify_<queue_name>` (a wake-up hint for listening workers)."""
        validate_queue_name(queue_name, field="queue_name")
        await self._run("pgmq_notify", [notify_channel(queue_name)], queue_name, conn)

    async def read(
        self,
        queue_name: str,
        visibility_timeout: int = 30,
        batch_size: int = 1,
        conn: AsyncConnection[Any] | None = None,
    ) -> list[PgmqMessage]:
        """Read up to `batch_size` visible messages, hiding them for `visibility_timeout` s."""
        validate_queue_name(queue_name, field="queue_name")
        _check_seconds("visibility_timeout", visibility_timeout)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValidationError("batch_size", batch_size, "must be an integer >= 1")
        rows = await self._run(
            "pgmq_read", [queue_name, visibility_timeout, batch_size], queue_name, conn
        )
        return [_to_message(r) for r in rows]

    async def delete(
        self, queue_name: str, msg_id: int, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """Delete a message; returns False when it was not there."""
        validate_queue_name(queue_name, field="queue_name")
        rows = await self._run("pgmq_delete", [queue_name, msg_id], queue_name, conn)
        return bool(rows and rows[0]["deleted"])

    async def delete_batch(
        self, queue_name: str, msg_ids: Sequence[int], conn: AsyncConnection[Any] | None = None
    ) -> list[int]:
        """Delete many messages in one call; returns the IDs that were deleted."""
        validate_queue_name(queue_name, field="queue_name")
        if not msg_ids:
            return []
        rows = await self._run("pgmq_delete_batch", [queue_name, list(msg_ids)], queue_name, conn)
        return [int(r["msg_id"]) for r in rows]

    async def archive(
        self, queue_name: str, msg_id: int, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """Move a message to the queue's archive table; returns False when it was not there."""
        validate_queue_name(queue_name, field="queue_name")
        rows = await self._run("pgmq_archive", [queue_name, msg_id], queue_name, conn)
        return bool(rows and rows[0]["archived"])

    async def archive_batch(
        self, queue_name: str, msg_ids: Sequence[int], conn: AsyncConnection[Any] | None = None
    ) -> list[int]:
        """Archive many messages in one call; returns the IDs that were archived."""
        validate_queue_name(queue_name, field="queue_name")
        if not msg_ids:
            return []
        rows = await self._run("pgmq_archive_batch", [queue_name, list(msg_ids)], queue_name, conn)
        return [int(r["msg_id"]) for r in rows]

    async def set_vt(
        self,
        queue_name: str,
        msg_id: int,
        visibility_timeout: int,
        conn: AsyncConnection[Any] | None = None,
    ) -> bool:
        """Make a message visible again `visibility_timeout` seconds from now (0: at once).

        Returns False when the message is not in the queue.
        """
        validate_queue_name(queue_name, field="queue_name")
        _check_seconds("visibility_timeout", visibility_timeout)
        rows = await self._run(
            "pgmq_set_vt", [queue_name, msg_id, visibility_timeout], queue_name, conn
        )
        return bool(rows)


async def _fetch(
    conn: AsyncConnection[Any], name: str, params: Sequence[Any]
) -> list[dict[str, Any]]:
    async with AsyncRawCursor(conn, row_factory=dict_row) as cur:
        await cur.execute(_sql.statement(name), params)
        return await cur.fetchall() if cur.description is not None else []


__all__ = ["PGMQ_NOTIFY_CHANNEL", "PgmqClient", "PgmqMessage", "map_queue_error", "notify_channel"]
