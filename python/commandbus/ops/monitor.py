"""The monitor read model: what an operator console shows, read so that a dashboard refreshing
every second stays cheap on a database of millions of commands and never slows the workers.

Every figure is bounded by an index range or a cap (the choices are in
`sql/migrations/V002__console.sql`):

* queue depth and leased messages: exact up to :data:`QUEUE_COUNT_CAP`, from the queue table;
* TSQ size: exact, through the partial index of the TSQ;
* counts of the other statuses: estimates from the multivariate statistics on
  (domain, status), as fresh as the last ANALYZE (`DomainStats.counts_estimated`);
* recent throughput: the audit rows of the last minutes, read backwards from the newest one by
  primary key; buckets that can no longer change are kept in memory, so a refresh reads only the
  last seconds. Keep one :class:`Monitor` per process.
* command lists: keyset pages (created_at, command_id), each call reading at most
  :data:`SCAN_LIMIT` rows of the created_at index: a page may hold fewer items than asked (a rare
  filter) and still have a `next_cursor` that resumes the scan.

Pure library: no web framework is imported.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from commandbus import _db, _sql
from commandbus._validation import validate_domain, validate_int, validate_uuid
from commandbus.exceptions import ValidationError
from commandbus.models import CommandMetadata, CommandStatus
from commandbus.process.models import ProcessMetadata, ProcessStatus
from commandbus.process.repository import _process_from_row
from commandbus.repositories.command import metadata_from_row

T = TypeVar("T")

#: Queue counts above this are not counted: depth becomes the msg_id span (an upper bound).
QUEUE_COUNT_CAP = 10_000
#: Rows of the created_at index read at most per list_commands call.
SCAN_LIMIT = 10_000
#: Width of a throughput bucket, in seconds.
BUCKET_SECONDS = 10
#: Audit rows up to the newest id a read saw this long ago are taken as committed (a worker's
#: flush inserts its audit rows and commits within milliseconds): they are counted once and kept;
#: newer ones are read again at each refresh.
_SETTLE = timedelta(seconds=3)

#: The throughput kept in memory, and the longest window `throughput()` accepts.
MAX_MINUTES = 60
#: How long a worker that disconnected stays listed.
WORKER_MEMORY = timedelta(minutes=10)
#: The rate of `DomainStats.completed_per_s` / `failed_per_s` is taken over this long.
RATE_WINDOW = timedelta(seconds=60)
_WORKER_PREFIX = "rcmd worker "
_TERMINAL_ESTIMATED = ("COMPLETED", "FAILED", "CANCELED")


@dataclass
class CommandFilter:
    """Which commands to list; every field optional (None: any)."""

    domain: str | None = None
    status: CommandStatus | None = None
    command_type: str | None = None
    batch_id: UUID | None = None
    command_id: UUID | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass
class Page(Generic[T]):
    """One page of a keyset listing. `next_cursor` (opaque) resumes after it; None at the end.
    `scanned`: the rows the call read when it stopped at its read limit (a short page of a
    rare filter), else the items."""

    items: list[T]
    next_cursor: str | None
    scanned: int = 0


@dataclass
class DomainStats:
    """One domain's live figures.

    `counts_by_status`: IN_TROUBLESHOOTING_QUEUE exact; PENDING (messages visible now) and
    IN_PROGRESS (messages leased, or waiting out a retry's backoff) from the queue, exact up to
    the cap; COMPLETED / FAILED / CANCELED estimated from the statistics (absent before the first
    ANALYZE). `queue_depth_exact` is False when the depth is the upper bound of a large queue.
    """

    domain: str
    counts_by_status: dict[str, int]
    queue_depth: int
    oldest_waiting_seconds: float | None
    tsq_size: int
    completed_per_s: float
    failed_per_s: float
    queue_depth_exact: bool = True
    counts_estimated: tuple[str, ...] = _TERMINAL_ESTIMATED


@dataclass(frozen=True)
class ThroughputPoint:
    """Commands completed and failed (moved to the TSQ, or failed by a business rule) in the
    bucket starting at `at`, over `seconds` (the elapsed part of the current bucket)."""

    at: datetime
    seconds: float
    completed: int
    failed: int

    @property
    def completed_per_s(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed_per_s(self) -> float:
        return self.failed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class WorkerSeen:
    """A worker process seen among this database's connections (`rcmd worker <domain>
    <host>:<pid>`); `connected` is False for one seen recently that has gone."""

    domain: str
    name: str
    connections: int
    active: int
    connected_since: datetime | None
    last_seen: datetime
    connected: bool = True


def encode_cursor(created_at: datetime, command_id: UUID) -> str:
    raw = f"{created_at.isoformat()}|{command_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """The (created_at, command_id) of a cursor; ValidationError naming `cursor` otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, cid = raw.split("|", 1)
        created_at = datetime.fromisoformat(ts)
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        return created_at, UUID(cid)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("cursor", cursor, "is not a cursor of this listing") from None


def _worker_from_row(row: dict[str, Any]) -> WorkerSeen:
    rest = str(row["application_name"])[len(_WORKER_PREFIX) :]
    domain, _, name = rest.partition(" ")
    return WorkerSeen(
        domain=domain,
        name=name or "?",
        connections=int(row["connections"]),
        active=int(row["active"]),
        connected_since=row["connected_since"],
        last_seen=row["at"],
    )


@dataclass
class _Throughput:
    """What the throughput reads remember: the counts of the audit rows with `audit_id <=
    settled_id` and `ts >= covered_from`, by bucket start -> domain -> (completed, failed)."""

    settled: dict[datetime, dict[str, tuple[int, int]]] = field(default_factory=dict)
    settled_id: int | None = None
    covered_from: datetime | None = None
    # The database's clock at the last read.
    last_now: datetime | None = None
    # (database clock, newest audit_id) of recent reads: `settled_id` advances to the newest id
    # a read saw at least _SETTLE ago.
    marks: deque[tuple[datetime, int]] = field(default_factory=deque)
    # The last result, its window and when it was read (time.monotonic()).
    last: tuple[datetime, dict[datetime, dict[str, tuple[int, int]]]] | None = None
    last_window: int = 0
    last_at: float = 0.0


class Monitor:
    """Reads for an operator console (dashboard, lists, workers). Keep one per process: it
    remembers settled throughput buckets and the workers seen recently."""

    def __init__(self, pool: AsyncConnectionPool[Any], *, reuse_seconds: float = 0.0) -> None:
        """`reuse_seconds`: a throughput read younger than this is reused (the console: its
        dashboard's two fragments and several viewers share one read a refresh)."""
        self._pool = pool
        self._reuse_seconds = reuse_seconds
        self._tp = _Throughput()
        self._workers: dict[tuple[str, str], WorkerSeen] = {}

    # -- domains and dashboard ---------------------------------------------------------

    async def domains(self) -> list[str]:
        """The domains that have a command queue, in name order."""
        rows = await _db.fetch_all(self._pool, "monitor_domains")
        return [str(r[0]) for r in rows]

    async def tsq_sizes(self) -> dict[str, int]:
        """The exact number of TSQ commands per domain (domains with none left out)."""
        rows = await _db.fetch_all(self._pool, "monitor_tsq_counts")
        return {str(r[0]): int(r[1]) for r in rows if int(r[1]) > 0}

    async def domain_stats(self) -> list[DomainStats]:
        """Per domain: counts by status, queue depth, oldest waiting, TSQ size, recent rates."""
        domains = await self.domains()
        tsq = await self.tsq_sizes()
        estimates: dict[str, dict[str, int]] = {}
        for r in await _db.fetch_all(self._pool, "monitor_status_estimates"):
            estimates.setdefault(str(r[0]), {})[str(r[1])] = int(r[2])
        points = await self._refresh_throughput(int(RATE_WINDOW.total_seconds()))
        now, by_domain = points
        rates: dict[str, tuple[int, int]] = {}
        since = now - RATE_WINDOW
        for bucket, per_domain in by_domain.items():
            if bucket + timedelta(seconds=BUCKET_SECONDS) <= since:
                continue
            for d, (c, f) in per_domain.items():
                old = rates.get(d, (0, 0))
                rates[d] = (old[0] + c, old[1] + f)
        span = RATE_WINDOW.total_seconds()
        out = []
        for domain in sorted(set(domains) | set(tsq)):
            q = await _db.fetch_one(
                self._pool,
                "monitor_queue_stats",
                _sql.command_queue(domain),
                QUEUE_COUNT_CAP,
                rows=dict,
            )
            q = q or {}
            depth = int(q.get("depth") or 0)
            leased = int(q.get("leased") or 0)
            oldest: datetime | None = q.get("oldest_visible")
            waiting = None if oldest is None else max((q["at"] - oldest).total_seconds(), 0.0)
            known = estimates.get(domain)
            # A status missing from the statistics of a domain they cover is (nearly) absent.
            counts = {s: known.get(s, 0) for s in _TERMINAL_ESTIMATED} if known else {}
            counts["PENDING"] = max(depth - leased, 0)
            counts["IN_PROGRESS"] = leased
            counts["IN_TROUBLESHOOTING_QUEUE"] = tsq.get(domain, 0)
            c, f = rates.get(domain, (0, 0))
            out.append(
                DomainStats(
                    domain=domain,
                    counts_by_status=counts,
                    queue_depth=depth,
                    queue_depth_exact=q.get("depth_exact") is not False,
                    counts_estimated=_TERMINAL_ESTIMATED
                    + (() if q.get("depth_exact") is not False else ("PENDING",)),
                    oldest_waiting_seconds=waiting,
                    tsq_size=tsq.get(domain, 0),
                    completed_per_s=c / span,
                    failed_per_s=f / span,
                )
            )
        return out

    # -- throughput --------------------------------------------------------------------

    async def _throughput_rows(
        self, after_id: int, start: datetime, last_id: int
    ) -> dict[datetime, dict[str, tuple[int, int]]]:
        """Completed and failed per bucket and domain, of the audit rows with audit_id in
        (after_id, last_id] and ts >= start (buckets cut by `start` left out)."""
        counts: dict[datetime, dict[str, tuple[int, int]]] = {}
        if last_id <= after_id:
            return counts
        rows = await _db.fetch_all(
            self._pool, "monitor_throughput", after_id, BUCKET_SECONDS, start, last_id, rows=dict
        )
        for r in rows:
            bucket: datetime = r["bucket"]
            if bucket < start:  # a bucket cut by the start: only its tail was read
                continue
            counts.setdefault(bucket, {})[str(r["domain"])] = (
                int(r["completed"]),
                int(r["failed"]),
            )
        return counts

    async def _refresh_throughput(
        self, window_seconds: int
    ) -> tuple[datetime, dict[datetime, dict[str, tuple[int, int]]]]:
        """Return (database now, all buckets of the window by start). The first read counts the
        whole window; later ones read only the audit rows newer than `settled_id` (the last
        few seconds: a refresh costs what the workers wrote since, not the window), and a
        result younger than `reuse_seconds` is reused."""
        tp = self._tp
        window = max(window_seconds, int(RATE_WINDOW.total_seconds()))
        if (
            tp.last is not None
            and tp.last_window >= window
            and time.monotonic() - tp.last_at < self._reuse_seconds
        ):
            return tp.last
        wanted = None if tp.last_now is None else tp.last_now - timedelta(seconds=window)
        if (
            wanted is None
            or tp.settled_id is None
            or tp.covered_from is None
            or tp.covered_from > _bucket_floor(wanted)
        ):
            # The memory does not reach back far enough: count the whole window once, rows
            # older than the settle time as settled.
            head = await _db.fetch_one(
                self._pool, "monitor_throughput_start", window, BUCKET_SECONDS, None, rows=dict
            )
            settle = await _db.fetch_one(
                self._pool,
                "monitor_throughput_start",
                int(_SETTLE.total_seconds()),
                1,
                None,
                rows=dict,
            )
            assert head is not None and settle is not None  # one row always
            now: datetime = head["at"]
            last_id = int(head["last_id"])
            start: datetime = head["start"]
            settled_id = max(int(settle["after_id"]), int(head["after_id"]))
            tp.settled = await self._throughput_rows(int(head["after_id"]), start, settled_id)
            tp.settled_id, tp.covered_from = settled_id, start
            tp.marks.clear()
        else:
            row = await _db.fetch_one(self._pool, "monitor_throughput_head", rows=dict)
            assert row is not None
            now, last_id = row["at"], int(row["last_id"])
            target = None
            while tp.marks and tp.marks[0][0] <= now - _SETTLE:
                target = tp.marks.popleft()[1]
            if target is not None and target > tp.settled_id:
                more = await self._throughput_rows(tp.settled_id, tp.covered_from, target)
                _add_counts(tp.settled, more)
                tp.settled_id = target
        fresh = await self._throughput_rows(tp.settled_id, tp.covered_from, last_id)
        tp.marks.append((now, last_id))
        tp.last_now = now
        step = timedelta(seconds=BUCKET_SECONDS)
        horizon = now - timedelta(minutes=MAX_MINUTES)
        for old in [k for k in tp.settled if k + step < horizon]:
            del tp.settled[old]
        if tp.covered_from < horizon:
            tp.covered_from = _bucket_floor(horizon) + step
        merged = {k: dict(v) for k, v in tp.settled.items()}
        _add_counts(merged, fresh)
        tp.last, tp.last_window, tp.last_at = (now, merged), window, time.monotonic()
        return now, merged

    async def throughput(
        self, *, minutes: int = 10, domain: str | None = None
    ) -> list[ThroughputPoint]:
        """Commands completed and failed per bucket of :data:`BUCKET_SECONDS` over the last
        `minutes` (at most :data:`MAX_MINUTES`), oldest first, every bucket present (zeros
        included); of one domain or all. Buckets before this Monitor first looked are read once,
        then kept."""
        validate_int("minutes", minutes, 1)
        if minutes > MAX_MINUTES:
            raise ValidationError("minutes", minutes, f"must be at most {MAX_MINUTES}")
        if domain is not None:
            validate_domain(domain)
        now, buckets = await self._refresh_throughput(minutes * 60)
        step = timedelta(seconds=BUCKET_SECONDS)
        current = _bucket_floor(now)
        b = current - step * (minutes * 60 // BUCKET_SECONDS - 1)
        points = []
        while b <= current:
            per_domain = buckets.get(b, {})
            if domain is None:
                c = sum(v[0] for v in per_domain.values())
                f = sum(v[1] for v in per_domain.values())
            else:
                c, f = per_domain.get(domain, (0, 0))
            seconds = (now - b).total_seconds() if b == current else float(BUCKET_SECONDS)
            points.append(ThroughputPoint(at=b, seconds=max(seconds, 0.001), completed=c, failed=f))
            b += step
        return points

    # -- workers -----------------------------------------------------------------------

    async def workers(self) -> list[WorkerSeen]:
        """Worker processes connected now, then those seen in the last
        :data:`WORKER_MEMORY` that have gone (`connected` False), by domain and name."""
        rows = await _db.fetch_all(self._pool, "monitor_workers", rows=dict)
        seen_now = {}
        for r in rows:
            w = _worker_from_row(r)
            seen_now[(w.domain, w.name)] = w
        now = rows[0]["at"] if rows else datetime.now(UTC)
        for key, w in list(self._workers.items()):
            if key not in seen_now:
                w.connected = False
                w.connections = 0
                w.active = 0
                if now - w.last_seen > WORKER_MEMORY:
                    del self._workers[key]
        self._workers.update(seen_now)
        return sorted(self._workers.values(), key=lambda w: (not w.connected, w.domain, w.name))

    # -- commands ----------------------------------------------------------------------

    async def list_commands(
        self, flt: CommandFilter, *, cursor: str | None = None, limit: int = 50
    ) -> Page[CommandMetadata]:
        """One page of the commands matching `flt`, newest first, after `cursor`."""
        validate_int("limit", limit, 1)
        if limit > 1000:
            raise ValidationError("limit", limit, "must be at most 1000")
        if flt.domain is not None:
            validate_domain(flt.domain)
        status = None if flt.status is None else _status(flt.status)
        if flt.command_id is not None:
            cid = validate_uuid(flt.command_id, "command_id")
            domains = [flt.domain] if flt.domain is not None else await self.domains()
            rows = await _db.fetch_all(self._pool, "monitor_command_by_id", cid, domains, rows=dict)
            items = [
                metadata_from_row(r)
                for r in rows
                if (status is None or r["status"] == status)
                and (flt.command_type is None or r["command_type"] == flt.command_type)
                and (flt.batch_id is None or r["batch_id"] == flt.batch_id)
            ]
            return Page(items=items, next_cursor=None, scanned=len(rows))
        after = None if cursor is None else decode_cursor(cursor)
        batch_id = None if flt.batch_id is None else validate_uuid(flt.batch_id, "batch_id")
        at = None if after is None else after[0]
        aid = None if after is None else after[1]
        by_time = flt.created_after is not None or flt.created_before is not None
        if batch_id is not None and flt.domain is not None and not by_time:
            # A batch's commands through its index, not the created_at scan: a batch is
            # created at one time, often long ago, and a bounded scan from now would miss it.
            batch_rows = await _db.fetch_all(
                self._pool,
                "monitor_list_batch_commands",
                flt.domain,
                batch_id,
                status,
                flt.command_type,
                at,
                aid,
                limit,
                rows=dict,
            )
            batch_items = [metadata_from_row(r) for r in batch_rows]
            last_item = batch_items[-1] if len(batch_items) >= limit else None
            return Page(
                items=batch_items,
                next_cursor=None
                if last_item is None
                else encode_cursor(last_item.created_at, last_item.command_id),
                scanned=len(batch_rows),
            )
        scan = SCAN_LIMIT
        rows = await _db.fetch_all(
            self._pool,
            "monitor_list_commands",
            flt.domain,
            status,
            flt.command_type,
            batch_id,
            flt.created_after,
            flt.created_before,
            at,
            aid,
            limit,
            scan,
            rows=dict,
        )
        items = [metadata_from_row(r) for r in rows]
        next_cursor: str | None = None
        scanned = len(rows)
        if len(rows) >= limit:
            last = rows[-1]
            next_cursor = encode_cursor(last["created_at"], last["command_id"])
        else:
            # Fewer matches than asked: either the end of the list, or the read's limit.
            end = await _db.fetch_one(
                self._pool,
                "monitor_scan_end",
                flt.created_after,
                flt.created_before,
                at,
                aid,
                scan,
                rows=dict,
            )
            if end is not None:
                scanned = scan
                next_cursor = encode_cursor(end["created_at"], end["command_id"])
        return Page(items=items, next_cursor=next_cursor, scanned=scanned)

    async def command_message(self, domain: str, msg_id: int | None) -> dict[str, Any] | None:
        """A command's queue message (its payload), from the queue or the archive; None when
        neither holds it any more."""
        validate_domain(domain)
        if msg_id is None:
            return None
        value = await _db.fetch_value(
            self._pool, "monitor_command_message", domain, msg_id, domain=domain
        )
        return value if isinstance(value, dict) else None

    # -- processes ---------------------------------------------------------------------

    async def process_domains(self) -> list[str]:
        """The domains that have processes, in name order."""
        rows = await _db.fetch_all(self._pool, "monitor_process_domains")
        return [str(r[0]) for r in rows]

    async def list_processes(
        self,
        domain: str,
        *,
        status: ProcessStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[ProcessMetadata[Any, Any]]:
        """One page of a domain's processes, newest first, after `cursor`."""
        validate_domain(domain)
        validate_int("limit", limit, 1)
        after = None if cursor is None else decode_cursor(cursor)
        st = None if status is None else ProcessStatus(status).value
        rows = await _db.fetch_all(
            self._pool,
            "monitor_list_processes",
            domain,
            st,
            None if after is None else after[0],
            None if after is None else after[1],
            limit,
            domain=domain,
        )
        items = [_process_from_row(r) for r in rows]
        next_cursor = (
            encode_cursor(items[-1].created_at, items[-1].process_id)
            if len(items) >= limit
            else None
        )
        return Page(items=items, next_cursor=next_cursor, scanned=len(rows))


def _add_counts(
    into: dict[datetime, dict[str, tuple[int, int]]],
    more: dict[datetime, dict[str, tuple[int, int]]],
) -> None:
    for bucket, per_domain in more.items():
        target = into.setdefault(bucket, {})
        for domain, (c, f) in per_domain.items():
            old = target.get(domain, (0, 0))
            target[domain] = (old[0] + c, old[1] + f)


def _bucket_floor(ts: datetime) -> datetime:
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    seconds = (ts - epoch).total_seconds()
    return epoch + timedelta(seconds=(seconds // BUCKET_SECONDS) * BUCKET_SECONDS)


def _status(value: CommandStatus | str) -> str:
    try:
        return CommandStatus(value).value
    except ValueError:
        raise ValidationError("status", value, "is not a CommandStatus") from None


__all__ = [
    "BUCKET_SECONDS",
    "QUEUE_COUNT_CAP",
    "SCAN_LIMIT",
    "CommandFilter",
    "DomainStats",
    "Monitor",
    "Page",
    "ThroughputPoint",
    "WorkerSeen",
    "decode_cursor",
    "encode_cursor",
]
