"""The sending side of the throughput benchmark, one subprocess per measurement.

Runs with either library (this repository's `commandbus`, or `reliable-cmd` 0.2.2 in its own
venv) through the public API both share: `CommandBus(pool).send / send_batch / create_batch`,
`SendRequest`, `BatchCommand`. Prints one JSON line with its measurement on stdout. Timings
cover the library calls only (not interpreter start, imports or building the requests).

Subcommands:
    single        N sends one at a time (latency of each); --conn: on a pool connection,
                  inside a transaction the caller opens (`send(..., conn=conn)`)
    batch         one `send_batch` of N commands (the library's default chunk of 1,000)
    create-batch  N commands as `create_batch` calls of --batch-size commands each
    pickup        N sends, one every --interval seconds; the time each send returned
    setup-pred    (predecessor venv only) its schema, its queue and its missing columns
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from psycopg_pool import AsyncConnectionPool

COMMAND_TYPE = "Noop"
WARMUP_SENDS = 20


def make_data(i: int, payload_bytes: int) -> dict[str, Any]:
    """The `data` of command `i`: `{"i": i, "pad": "xxx..."}`, about `payload_bytes` of JSON."""
    base = len(json.dumps({"i": i, "pad": ""}))
    return {"i": i, "pad": "x" * max(0, payload_bytes - base)}


def make_message(domain: str, command_id: UUID, data: dict[str, Any]) -> dict[str, Any]:
    """The queue message both libraries write for a command (used by the raw PGMQ ceiling)."""
    return {
        "domain": domain,
        "command_type": COMMAND_TYPE,
        "command_id": str(command_id),
        "correlation_id": str(uuid4()),
        "data": data,
    }


class PgCpu:
    """CPU seconds used so far by a local PostgreSQL server: its postmaster and children.

    Live processes count with their scheduler run time (/proc/PID/schedstat, nanoseconds;
    /proc/PID/stat clock ticks where schedstat is missing). Backends that exited were reaped
    by the postmaster, so their time is in its cutime + cstime. `sample()` is None when the
    server's processes are not visible in /proc (a remote server).
    """

    def __init__(self, postmaster_pid: int | None) -> None:
        ok = postmaster_pid is not None and self.stat_fields(postmaster_pid) is not None
        self.pid = postmaster_pid if ok else None
        self._tick = float(os.sysconf("SC_CLK_TCK"))

    @staticmethod
    def stat_fields(pid: int | str) -> list[str] | None:
        """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [11] utime,
        [12] stime, [13] cutime, [14] cstime."""
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return text.rsplit(")", 1)[1].split()

    def _run_time(self, pid: int | str, fields: list[str]) -> float:
        try:
            return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return (int(fields[11]) + int(fields[12])) / self._tick

    def sample(self) -> float | None:
        if self.pid is None:
            return None
        own = self.stat_fields(self.pid)
        if own is None:
            return None
        total = self._run_time(self.pid, own) + (int(own[13]) + int(own[14])) / self._tick
        parent = str(self.pid)
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = self.stat_fields(entry.name)
                if fields is not None and fields[1] == parent:
                    total += self._run_time(entry.name, fields)
        return total


class _Meter:
    """PostgreSQL CPU over the timed part of a measurement (when --pg-pid is given)."""

    def __init__(self, pg_pid: int | None) -> None:
        self._cpu = PgCpu(pg_pid) if pg_pid else None
        self._start: float | None = None
        self.seconds: float | None = None

    def start(self) -> None:
        self._start = self._cpu.sample() if self._cpu else None

    def stop(self) -> None:
        end = self._cpu.sample() if self._cpu else None
        if self._start is not None and end is not None:
            self.seconds = end - self._start


def _emit(payload: dict[str, Any]) -> None:
    import commandbus

    payload["library"] = commandbus.__file__  # which package this venv imported
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _close(bus: Any) -> None:
    close = getattr(bus, "close", None)  # the predecessor's bus has no close()
    if close is not None:
        await close()


async def _single(pool: AsyncConnectionPool[Any], args: argparse.Namespace) -> dict[str, Any]:
    from commandbus import CommandBus

    bus = CommandBus(pool)
    data = [make_data(i, args.payload_bytes) for i in range(args.n)]

    async def send_one(d: dict[str, Any]) -> None:
        if args.conn:
            async with pool.connection() as conn, conn.transaction():
                await bus.send(args.domain, COMMAND_TYPE, uuid4(), d, conn=conn)
        else:
            await bus.send(args.domain, COMMAND_TYPE, uuid4(), d)

    try:
        for i in range(WARMUP_SENDS):
            await send_one(make_data(-i, args.payload_bytes))
        latencies: list[float] = []
        meter = _Meter(args.pg_pid)
        meter.start()
        t0 = time.perf_counter()
        for d in data:
            t = time.perf_counter()
            await send_one(d)
            latencies.append((time.perf_counter() - t) * 1000.0)
        seconds = time.perf_counter() - t0
        meter.stop()
    finally:
        await _close(bus)
    return {
        "seconds": seconds,
        "latencies_ms": latencies,
        "warmup": WARMUP_SENDS,
        "pg_cpu_seconds": meter.seconds,
    }


async def _batch(pool: AsyncConnectionPool[Any], args: argparse.Namespace) -> dict[str, Any]:
    from commandbus import CommandBus, SendRequest

    bus = CommandBus(pool)
    requests = [
        SendRequest(args.domain, COMMAND_TYPE, uuid4(), make_data(i, args.payload_bytes))
        for i in range(args.n)
    ]
    meter = _Meter(args.pg_pid)
    try:
        meter.start()
        t0 = time.perf_counter()
        result = await bus.send_batch(requests)
        seconds = time.perf_counter() - t0
        meter.stop()
    finally:
        await _close(bus)
    return {"seconds": seconds, "sent": result.total_commands, "pg_cpu_seconds": meter.seconds}


async def _create_batch(pool: AsyncConnectionPool[Any], args: argparse.Namespace) -> dict[str, Any]:
    from commandbus import BatchCommand, CommandBus

    bus = CommandBus(pool)
    size: int = args.batch_size
    batches = [
        [
            BatchCommand(COMMAND_TYPE, uuid4(), make_data(i, args.payload_bytes))
            for i in range(start, min(start + size, args.n))
        ]
        for start in range(0, args.n, size)
    ]
    sent = 0
    meter = _Meter(args.pg_pid)
    try:
        meter.start()
        t0 = time.perf_counter()
        for commands in batches:
            result = await bus.create_batch(args.domain, commands)
            sent += result.total_commands
        seconds = time.perf_counter() - t0
        meter.stop()
    finally:
        await _close(bus)
    return {
        "seconds": seconds,
        "sent": sent,
        "batches": len(batches),
        "pg_cpu_seconds": meter.seconds,
    }


async def _pickup(pool: AsyncConnectionPool[Any], args: argparse.Namespace) -> dict[str, Any]:
    from commandbus import CommandBus

    bus = CommandBus(pool)
    sent: dict[str, float] = {}
    try:
        for i in range(WARMUP_SENDS):  # connections of the bus, warm caches: not recorded
            await bus.send(args.domain, COMMAND_TYPE, uuid4(), make_data(-i, args.payload_bytes))
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        for i in range(args.n):
            delay = t0 + i * args.interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            command_id = uuid4()
            await bus.send(args.domain, COMMAND_TYPE, command_id, make_data(i, args.payload_bytes))
            sent[str(command_id)] = time.time()
    finally:
        await _close(bus)
    return {"sent": sent, "warmup": WARMUP_SENDS}


async def _setup_pred(pool: AsyncConnectionPool[Any], args: argparse.Namespace) -> dict[str, Any]:
    """The predecessor's schema through its own `setup_database`, plus what it lacks.

    - Its V001 runs `CREATE EXTENSION IF NOT EXISTS pgmq`. Where the server has no pgmq
      extension the benchmark installed PGMQ's SQL-only version beforehand (the same PGMQ the
      new library uses), and that one statement is left out of the script it runs.
    - Its packaged V002 (batch.failed_count), which `setup_database` does not apply, and the
      `batch.batch_type` column its batch repository writes but no migration creates: only
      needed by `create_batch`.
    - Its queue: it never creates one itself (`pgmq.create`, through its PgmqClient).
    """
    import commandbus.setup as setup_module
    from commandbus import PgmqClient, setup_database

    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'pgmq'")
        row = await cur.fetchone()
    extension_available = bool(row and row[0])
    shimmed = False
    if not extension_available:
        original = setup_module.get_schema_sql
        statement = "CREATE EXTENSION IF NOT EXISTS pgmq;"
        if statement not in original():
            raise RuntimeError(f"{statement!r} not found in the predecessor's schema")

        def schema_without_extension() -> str:
            return original().replace(statement, "-- pgmq: installed from SQL beforehand")

        setup_module.get_schema_sql = schema_without_extension
        shimmed = True
    created = await setup_database(pool)
    v002 = (
        importlib.resources.files("commandbus.migrations")
        .joinpath("V002__add_failed_count.sql")
        .read_text(encoding="utf-8")
    )
    async with pool.connection() as conn:
        await conn.execute(v002.encode())
        await conn.execute(
            "ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS batch_type TEXT NOT NULL "
            "DEFAULT 'COMMAND'"
        )
    await PgmqClient(pool).create_queue(f"{args.domain}__commands")
    return {"created": created, "extension_shim": shimmed}


_COMMANDS = {
    "single": _single,
    "batch": _batch,
    "create-batch": _create_batch,
    "pickup": _pickup,
    "setup-pred": _setup_pred,
}


async def _main(args: argparse.Namespace) -> int:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        args.dsn, min_size=1, max_size=4, open=False
    )
    await pool.open(wait=True)
    try:
        _emit(await _COMMANDS[args.command](pool, args))
    finally:
        await pool.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=sorted(_COMMANDS))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--payload-bytes", type=int, default=128)
    parser.add_argument("--conn", action="store_true", help="single: send(..., conn=conn)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--pg-pid", type=int, default=None, help="postmaster, for PG CPU")
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
