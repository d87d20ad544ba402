"""Batch rows: the predecessor's ``PostgresBatchRepository``, on the statements of `sql/`.

Counters and completion move only in ``commandbus.apply_batch_delta_v1``: the TSQ
methods and ``refresh_stats`` call it, so BATCH_COMPLETED and the completion NOTIFY are written
the same way whichever path completes a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import orjson
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus._validation import validate_page
from commandbus.batch import batch_from_row
from commandbus.exceptions import ValidationError
from commandbus.models import BatchMetadata, BatchStatus

logger = logging.getLogger(__name__)


def _status_text(status: BatchStatus | str | None) -> str | None:
    if status is None:
        return None
    try:
        return BatchStatus(status).value
    except ValueError:
        raise ValidationError("status", status, "is not a BatchStatus") from None


class PostgresBatchRepository:
    """Reads and writes ``commandbus.batch`` rows. Every method takes an optional `conn` (the
    caller's transaction); without it a connection of the pool is used and committed."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def create(
        self,
        domain: str,
        batch_id: UUID,
        batch_type: str,
        name: str | None,
        custom_data_json: str | None,
        columns: Sequence[Sequence[Any]],
        conn: AsyncConnection[Any] | None = None,
    ) -> list[tuple[UUID, int, UUID]]:
        """Write a batch and its commands in one call (`create_batch_v2`). `columns` are the
        command arrays of `send_commands_v2` without the batch ids: ids, types, queue messages
        (JSON text), correlation ids, reply queues, max attempts. Returns (command_id, msg_id,
        correlation_id) per command, in order."""
        rows = await _db.fetch_all(
            conn or self._pool,
            "batch_create",
            domain, batch_id, batch_type, name, custom_data_json, *columns,
            domain=domain,
        )  # fmt: skip
        return [(r[0], r[1], r[2]) for r in rows]

    async def save(self, metadata: BatchMetadata, conn: AsyncConnection[Any] | None = None) -> None:
        """Insert a batch row as given (no commands). Raises DuplicateBatchError."""
        custom = None if metadata.custom_data is None else orjson.dumps(metadata.custom_data)
        await _db.execute(
            conn or self._pool,
            "batch_save",
            metadata.domain, metadata.batch_id, metadata.batch_type, metadata.name,
            None if custom is None else custom.decode(), BatchStatus(metadata.status).value,
            metadata.total_count, metadata.completed_count, metadata.failed_count,
            metadata.canceled_count, metadata.in_troubleshooting_count, metadata.created_at,
            metadata.started_at, metadata.completed_at,
            domain=metadata.domain,
        )  # fmt: skip
        logger.debug("saved batch %s.%s", metadata.domain, metadata.batch_id)

    async def get(
        self, domain: str, batch_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> BatchMetadata | None:
        """The batch, or None when it does not exist."""
        row = await _db.fetch_one(conn or self._pool, "batch_get", domain, batch_id, domain=domain)
        return None if row is None else batch_from_row(row)

    async def exists(
        self, domain: str, batch_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """True when the batch exists in the domain."""
        return bool(
            await _db.fetch_value(
                conn or self._pool, "batch_exists", domain, batch_id, domain=domain
            )
        )

    async def list_batches(
        self,
        domain: str,
        *,
        status: BatchStatus | str | None = None,
        limit: int = 100,
        offset: int = 0,
        conn: AsyncConnection[Any] | None = None,
        waiting_for_operator: bool | None = None,
    ) -> list[BatchMetadata]:
        """The domain's batches, newest first, optionally of one status. `waiting_for_operator`
        True keeps only the batches whose remaining commands all wait in the TSQ
        (`BatchMetadata.waiting_for_operator`), False only the others; None does not filter."""
        validate_page(limit, offset)
        if waiting_for_operator is not None and not isinstance(waiting_for_operator, bool):
            raise ValidationError(
                "waiting_for_operator", waiting_for_operator, "must be True, False or None"
            )
        rows = await _db.fetch_all(
            conn or self._pool,
            "batch_list",
            domain,
            _status_text(status),
            limit,
            offset,
            waiting_for_operator,
            domain=domain,
        )
        return [batch_from_row(r) for r in rows]

    async def _delta(
        self,
        domain: str,
        batch_id: UUID,
        deltas: tuple[int, int, int, int],
        conn: AsyncConnection[Any] | None,
    ) -> bool:
        completed = await _db.fetch_value(
            conn or self._pool, "batch_apply_delta", domain, batch_id, *deltas, domain=domain
        )
        return bool(completed)

    async def tsq_complete(
        self, domain: str, batch_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """An operator completed a command of the batch from the TSQ: in_troubleshooting - 1,
        completed + 1. True when this completed the batch."""
        return await self._delta(domain, batch_id, (1, 0, 0, -1), conn)

    async def tsq_cancel(
        self, domain: str, batch_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> bool:
        """An operator canceled a command of the batch from the TSQ: in_troubleshooting - 1,
        canceled + 1. True when this completed the batch."""
        return await self._delta(domain, batch_id, (0, 0, 1, -1), conn)

    async def tsq_retry(
        self, domain: str, batch_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> None:
        """An operator sent a command of the batch back to the queue: in_troubleshooting - 1
        (a retry never completes a batch)."""
        await self._delta(domain, batch_id, (0, 0, 0, -1), conn)

    async def refresh_stats(
        self, domain: str, batch_id: UUID, conn: AsyncConnection[Any] | None = None
    ) -> BatchMetadata | None:
        """Recount the batch's counters from its commands (repair tool) and return the batch,
        or None when it does not exist."""
        if conn is not None:
            await _db.execute(conn, "batch_refresh_stats", domain, batch_id, domain=domain)
            return await self.get(domain, batch_id, conn)
        async with _db.bounded(self._pool), self._pool.connection() as own:
            await _db.execute(own, "batch_refresh_stats", domain, batch_id, domain=domain)
            return await self.get(domain, batch_id, own)


__all__ = ["PostgresBatchRepository"]
