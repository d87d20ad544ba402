"""PGMQ client: the predecessor's `PgmqClient` API over the SQL of `sql/statements/pgmq.sql`.

Messages are read by column name (PGMQ 1.13's `read` returns `msg_id, read_ct, enqueued_at,
last_read_at, vt, message, headers`; older versions lack some of these: the statements select
only the columns used). Every method takes an optional `conn=` to run inside the caller's
transaction; without it a connection of the pool is used (and committed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus._errors import map_queue_error  # re-exported: part of this module's API
from commandbus._validation import encode_json, validate_queue_name
from commandbus.exceptions import ValidationError

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

    async def create_queue(self, queue_name: str, conn: AsyncConnection[Any] | None = None) -> None:
        """Create a queue if it does not exist (idempotent, safe under concurrent calls)."""
        validate_queue_name(queue_name, field="queue_name")
        created = await _db.fetch_value(
            conn or self._pool, "ensure_queue", queue_name, queue=queue_name
        )
        if created:
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
        msg_id = int(
            await _db.fetch_value(
                conn or self._pool,
                "pgmq_send",
                queue_name,
                text,
                _check_seconds("delay", delay),
                notify_channel(queue_name),
                queue=queue_name,
            )
        )
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
        rows = await _db.fetch_all(
            conn or self._pool, "pgmq_send_batch", queue_name, texts, delay, queue=queue_name
        )
        return [int(r[0]) for r in rows]

    async def notify(self, queue_name: str, conn: AsyncConnection[Any] | None = None) -> None:
        """NOTIFY `pgmq_notify_<queue_name>` (a wake-up hint for listening workers)."""
        validate_queue_name(queue_name, field="queue_name")
        await _db.execute(
            conn or self._pool, "pgmq_notify", notify_channel(queue_name), queue=queue_name
        )

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
        rows = await _db.fetch_all(
            conn or self._pool,
            "pgmq_read",
            queue_name,
            visibility_timeout,
            batch_size,
            rows=dict,
            queue=queue_name,
        )
        return [_to_message(r) for r in rows]

    async def delete(
        self, queue_name: str, msg_id: int, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """Delete a message; returns False when it was not there."""
        validate_queue_name(queue_name, field="queue_name")
        deleted = await _db.fetch_value(
            conn or self._pool, "pgmq_delete", queue_name, msg_id, queue=queue_name
        )
        return bool(deleted)

    async def delete_batch(
        self, queue_name: str, msg_ids: Sequence[int], conn: AsyncConnection[Any] | None = None
    ) -> list[int]:
        """Delete many messages in one call; returns the IDs that were deleted."""
        validate_queue_name(queue_name, field="queue_name")
        if not msg_ids:
            return []
        rows = await _db.fetch_all(
            conn or self._pool, "pgmq_delete_batch", queue_name, list(msg_ids), queue=queue_name
        )
        return [int(r[0]) for r in rows]

    async def archive(
        self, queue_name: str, msg_id: int, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """Move a message to the queue's archive table; returns False when it was not there."""
        validate_queue_name(queue_name, field="queue_name")
        archived = await _db.fetch_value(
            conn or self._pool, "pgmq_archive", queue_name, msg_id, queue=queue_name
        )
        return bool(archived)

    async def archive_batch(
        self, queue_name: str, msg_ids: Sequence[int], conn: AsyncConnection[Any] | None = None
    ) -> list[int]:
        """Archive many messages in one call; returns the IDs that were archived."""
        validate_queue_name(queue_name, field="queue_name")
        if not msg_ids:
            return []
        rows = await _db.fetch_all(
            conn or self._pool, "pgmq_archive_batch", queue_name, list(msg_ids), queue=queue_name
        )
        return [int(r[0]) for r in rows]

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
        row = await _db.fetch_one(
            conn or self._pool,
            "pgmq_set_vt",
            queue_name,
            msg_id,
            visibility_timeout,
            queue=queue_name,
        )
        return row is not None


__all__ = ["PGMQ_NOTIFY_CHANNEL", "PgmqClient", "PgmqMessage", "map_queue_error", "notify_channel"]
