"""The troubleshooting queue (TSQ): commands that failed permanently or used up their retries,
waiting for an operator to retry, cancel or complete them.

Every operator action is one SQL function call (`tsq_*_v1`) in one transaction: it locks
the command row, checks that the command is still in the TSQ, writes the audit row with the
operator's name, sends the reply and moves the batch counters. When two operators act on one
command at once, exactly one succeeds; the other gets :class:`InvalidOperationError`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from commandbus import _db
from commandbus._validation import (
    encode_json,
    validate_domain,
    validate_int,
    validate_page,
    validate_text,
    validate_uuid,
)
from commandbus.exceptions import (
    CommandNotFoundError,
    ValidationError,
)
from commandbus.models import TroubleshootingItem
from commandbus.policies import DEFAULT_RETRY_POLICY

logger = logging.getLogger(__name__)

#: Called after each chunk of a bulk action with the number of commands handled so far.
ProgressCallback = Callable[[int], None]
# One chunk of a bulk action: (cutoff, after) -> (examined, affected, cutoff, after).
_BulkChunk = Callable[[datetime | None, UUID | None], Awaitable[_db.TupleRow | None]]

DEFAULT_BULK_CHUNK_SIZE = 500
# The same ceiling the worker puts on a handler's result.
_MAX_RESULT_BYTES = 8 * 1_048_576


def _check_optional_text(name: str, value: str | None) -> str | None:
    return validate_text(name, value, optional=True)


def _row_to_item(row: Sequence[Any]) -> TroubleshootingItem:
    (domain, command_id, command_type, attempts, max_attempts, etype, ecode, emsg,
     correlation_id, reply_to, payload, created_at, updated_at) = row  # fmt: skip
    return TroubleshootingItem(
        domain=domain,
        command_id=command_id,
        command_type=command_type,
        attempts=attempts,
        # NULL: the worker's RetryPolicy decides; report its default as the bus does.
        max_attempts=max_attempts
        if max_attempts is not None
        else DEFAULT_RETRY_POLICY.max_attempts,
        last_error_type=etype,
        last_error_code=ecode,
        last_error_msg=emsg,
        correlation_id=correlation_id,
        reply_to=reply_to,
        payload=payload,
        created_at=created_at,
        updated_at=updated_at,
    )


class TroubleshootingQueue:
    """Operations on the commands in the troubleshooting queue.

    Example:
        tsq = TroubleshootingQueue(pool)
        for item in await tsq.list_troubleshooting("payments"):
            print(item.command_type, item.last_error_msg)
        await tsq.operator_retry("payments", item.command_id, operator="alice")
    """

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        """Args:
        pool: the psycopg async pool; each call takes one connection (one transaction).
        """
        self._pool = pool

    # -- listing -------------------------------------------------------------------------

    async def list_troubleshooting(
        self,
        domain: str,
        command_type: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[TroubleshootingItem]:
        """List a domain's TSQ commands, most recently failed first, each with its archived
        queue message (`payload`, None when the archive no longer has it) and last error."""
        validate_domain(domain)
        _check_optional_text("command_type", command_type)
        validate_page(limit, offset)
        rows = await _db.fetch_all(
            self._pool, "tsq_list", domain, command_type, limit, offset, domain=domain
        )
        return [_row_to_item(r) for r in rows]

    async def count_troubleshooting(self, domain: str, command_type: str | None = None) -> int:
        """Count a domain's TSQ commands (optionally of one command type)."""
        validate_domain(domain)
        _check_optional_text("command_type", command_type)
        count = await _db.fetch_value(self._pool, "tsq_count", domain, command_type, domain=domain)
        return int(count)

    async def list_domains(self) -> list[str]:
        """List the domains that have commands in the TSQ, in name order."""
        rows = await _db.fetch_all(self._pool, "tsq_domains")
        return [str(r[0]) for r in rows]

    async def get_command_domain(self, command_id: UUID) -> str:
        """Return the domain of a command (one in the TSQ first, should the id exist in
        several domains).

        Raises:
            CommandNotFoundError: no domain has the command (domain reported as "unknown").
        """
        cid = validate_uuid(command_id, "command_id")
        row = await _db.fetch_one(self._pool, "tsq_command_domain", cid)
        if row is None:
            raise CommandNotFoundError("unknown", str(cid))
        return str(row[0])

    async def list_command_ids(self, domain: str | None = None) -> list[UUID]:
        """Return the ids of all TSQ commands (of one domain, or all), newest first."""
        if domain is not None:
            validate_domain(domain)
        rows = await _db.fetch_all(self._pool, "tsq_command_ids", domain, domain=domain)
        return [r[0] for r in rows]

    async def list_all_troubleshooting(
        self,
        limit: int = 50,
        offset: int = 0,
        domain: str | None = None,
    ) -> tuple[list[TroubleshootingItem], int, list[UUID]]:
        """List TSQ commands across domains (or of one), most recently failed first.

        Returns:
            (the page of items, the total number of TSQ commands, all their command ids).
        """
        if domain is not None:
            validate_domain(domain)
        validate_page(limit, offset)
        rows = await _db.fetch_all(self._pool, "tsq_list_all", domain, limit, offset, domain=domain)
        command_ids = await self.list_command_ids(domain)
        return [_row_to_item(r) for r in rows], len(command_ids), command_ids

    # -- operator actions ----------------------------------------------------------------

    async def operator_retry(
        self, domain: str, command_id: UUID, operator: str | None = None
    ) -> int:
        """Send the command's archived message again: status PENDING, attempts 0, a new
        msg_id; workers are woken. Returns the new msg_id.

        Raises:
            CommandNotFoundError: the domain has no such command.
            InvalidOperationError: the command is not in the TSQ, or its archived message is
                gone (cancel or complete it instead).
        """
        validate_domain(domain)
        cid = validate_uuid(command_id, "command_id")
        _check_optional_text("operator", operator)
        new_msg_id = int(
            await _db.fetch_value(self._pool, "tsq_retry", domain, cid, operator, domain=domain)
        )
        logger.info(
            "operator retry of %s.%s by %s: new msg_id %s", domain, cid, operator, new_msg_id
        )
        return new_msg_id

    async def operator_cancel(
        self, domain: str, command_id: UUID, reason: str, operator: str | None = None
    ) -> None:
        """Cancel the command: status CANCELED, a CANCELED reply (with `reason`) where the
        command has a reply queue; a batch counts it as canceled.

        Raises:
            CommandNotFoundError: the domain has no such command.
            InvalidOperationError: the command is not in the TSQ.
        """
        validate_domain(domain)
        cid = validate_uuid(command_id, "command_id")
        validate_text("reason", reason)
        _check_optional_text("operator", operator)
        await _db.execute(self._pool, "tsq_cancel", domain, cid, reason, operator, domain=domain)
        logger.info("operator cancel of %s.%s by %s: %s", domain, cid, operator, reason)

    async def operator_complete(
        self,
        domain: str,
        command_id: UUID,
        result_data: dict[str, Any] | None = None,
        operator: str | None = None,
    ) -> None:
        """Complete the command by hand: status COMPLETED with `result_data` stored as its
        result, a SUCCESS reply carrying it where the command has a reply queue; a batch
        counts it as completed.

        Raises:
            CommandNotFoundError: the domain has no such command.
            InvalidOperationError: the command is not in the TSQ.
            ValidationError: `result_data` is not a dict or not JSON-serialisable.
        """
        validate_domain(domain)
        cid = validate_uuid(command_id, "command_id")
        _check_optional_text("operator", operator)
        result_json: str | None = None
        if result_data is not None:
            if not isinstance(result_data, dict):
                raise ValidationError("result_data", result_data, "must be a dict or None")
            result_json = encode_json(result_data, "result_data", _MAX_RESULT_BYTES)
        await _db.execute(
            self._pool, "tsq_complete", domain, cid, result_json, operator, domain=domain
        )
        logger.info("operator complete of %s.%s by %s", domain, cid, operator)

    # -- bulk actions --------------------------------------------------------------------

    @staticmethod
    async def _bulk(chunk: _BulkChunk, on_progress: ProgressCallback | None) -> int:
        """Call a chunked bulk function until it finds nothing more; one transaction per chunk.
        `chunk(cutoff, after)` runs one chunk, resuming after the previous one's position. Only
        commands already in the TSQ when the first chunk ran are handled."""
        cutoff: datetime | None = None
        after: UUID | None = None
        done = 0
        while True:
            row = await chunk(cutoff, after)
            assert row is not None  # the bulk functions always return their one row
            examined, affected, cutoff, after = row
            if examined == 0:
                return done
            done += int(affected)
            if on_progress is not None:
                on_progress(done)

    async def retry_all(
        self,
        domain: str,
        command_type: str | None = None,
        operator: str | None = None,
        chunk_size: int = DEFAULT_BULK_CHUNK_SIZE,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> int:
        """Retry every TSQ command of the domain (optionally of one type), `chunk_size` per
        transaction. Commands whose archived message is gone are left in the TSQ. Returns how
        many were retried; `on_progress(retried_so_far)` runs after each chunk."""
        validate_domain(domain)
        _check_optional_text("command_type", command_type)
        _check_optional_text("operator", operator)
        validate_int("chunk_size", chunk_size, 1)
        total = await self._bulk(
            lambda cutoff, after: _db.fetch_one(
                self._pool,
                "tsq_retry_all",
                domain,
                command_type,
                operator,
                chunk_size,
                cutoff,
                after,
                domain=domain,
            ),
            on_progress,
        )
        logger.info("operator bulk retry in %s by %s: %d commands", domain, operator, total)
        return total

    async def cancel_all(
        self,
        domain: str,
        reason: str,
        command_type: str | None = None,
        operator: str | None = None,
        chunk_size: int = DEFAULT_BULK_CHUNK_SIZE,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> int:
        """Cancel every TSQ command of the domain (optionally of one type), `chunk_size` per
        transaction, with CANCELED replies as `operator_cancel` sends them. Returns how many
        were canceled; `on_progress(canceled_so_far)` runs after each chunk."""
        validate_domain(domain)
        validate_text("reason", reason)
        _check_optional_text("command_type", command_type)
        _check_optional_text("operator", operator)
        validate_int("chunk_size", chunk_size, 1)
        total = await self._bulk(
            lambda cutoff, after: _db.fetch_one(
                self._pool,
                "tsq_cancel_all",
                domain,
                reason,
                command_type,
                operator,
                chunk_size,
                cutoff,
                after,
                domain=domain,
            ),
            on_progress,
        )
        logger.info("operator bulk cancel in %s by %s: %d commands", domain, operator, total)
        return total


__all__ = ["DEFAULT_BULK_CHUNK_SIZE", "ProgressCallback", "TroubleshootingQueue"]
