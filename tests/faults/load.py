"""The load of the fault suite: worker and sender processes (tests/faults/harness.py starts them).

    python load.py worker DSN DOMAIN --concurrency N --vt SECONDS
    python load.py sender DSN DOMAIN REPLY_QUEUE BASE --rate N [--batch-every K]

worker
    Runs one `Worker` on DOMAIN (command type `Work`: sleeps 2 ms, returns {"n": n}; raises
    `BusinessRuleException` when the data has "fail": true) until SIGTERM, and prints
    `STATS {json}` (the engine's counters: claimed, applied, fenced...) every 0.2 s.
sender
    Sends continuously, about RATE commands a second in ticks of 0.1 s, every command with
    `reply_to`: each tick one `send_batch` of RATE/10 commands, or, every K-th tick, one
    `create_batch` of that size. Command i has the id UUID(int=BASE | i), batch k the id
    UUID(int=BASE | 2**31 | k); one command in ten has "fail": true. Prints, per tick,
    `ACK first last [batch_k]` once the call returned, or `ERR first last ExceptionName` (the
    outcome is unknown: the harness looks the ids up), and `END next` after SIGTERM.

stdout carries only these lines (flushed at once); logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from commandbus import (
    BatchCommand,
    BusinessRuleException,
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    SendRequest,
    Worker,
)

COMMAND_TYPE = "Work"
BATCH_FLAG = 1 << 31


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def work(args: argparse.Namespace) -> int:
    async def handle(command: Command, context: HandlerContext) -> dict[str, Any]:
        await asyncio.sleep(0.002)
        if command.data.get("fail"):
            raise BusinessRuleException(code="REFUSED", message="refused by the fault load")
        return {"n": command.data["n"]}

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        args.dsn, min_size=1, max_size=2, open=False
    )
    await pool.open(wait=True, timeout=60)
    registry = HandlerRegistry()
    registry.register(args.domain, COMMAND_TYPE, handle)
    worker = Worker(pool, args.domain, registry, visibility_timeout=args.vt)

    async def report() -> None:
        while True:
            say("STATS " + json.dumps(worker.stats()))
            await asyncio.sleep(0.2)

    reporter = asyncio.create_task(report())
    try:
        await worker.run(concurrency=args.concurrency, poll_interval=0.2, handle_signals=True)
        say("STATS " + json.dumps(worker.stats()))
        say("STOPPED")
    finally:
        reporter.cancel()
        await pool.close()
    return 0


async def send(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        args.dsn, min_size=1, max_size=2, open=False
    )
    await pool.open(wait=True, timeout=60)
    bus = CommandBus(pool)
    base = int(args.base, 16)
    per_tick = max(1, args.rate // 10)
    seq = 0
    tick = 0
    next_tick = time.monotonic()
    try:
        while not stop.is_set():
            first, last = seq, seq + per_tick - 1
            seq += per_tick
            tick += 1
            ids = [UUID(int=base | i) for i in range(first, last + 1)]
            data = [{"n": i, "fail": i % 10 == 7} for i in range(first, last + 1)]
            batch = tick % args.batch_every == 0 if args.batch_every else False
            try:
                if batch:
                    await asyncio.wait_for(
                        bus.create_batch(
                            args.domain,
                            [
                                BatchCommand(COMMAND_TYPE, cid, d, reply_to=args.reply_queue)
                                for cid, d in zip(ids, data, strict=True)
                            ],
                            batch_id=UUID(int=base | BATCH_FLAG | tick),
                            name=f"faults {tick}",
                        ),
                        args.call_timeout,
                    )
                    say(f"ACK {first} {last} {tick}")
                else:
                    await asyncio.wait_for(
                        bus.send_batch(
                            [
                                SendRequest(
                                    args.domain, COMMAND_TYPE, cid, d, reply_to=args.reply_queue
                                )
                                for cid, d in zip(ids, data, strict=True)
                            ]
                        ),
                        args.call_timeout,
                    )
                    say(f"ACK {first} {last}")
            except Exception as exc:
                say(f"ERR {first} {last} {type(exc).__name__}" + (f" {tick}" if batch else ""))
                logging.getLogger("faults.sender").info("send failed: %r", exc)
                await asyncio.sleep(0.2)
            next_tick = max(next_tick + 0.1, time.monotonic() - 0.5)
            delay = next_tick - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
    finally:
        say(f"END {seq}")
        await bus.close()
        await pool.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker")
    w.add_argument("dsn")
    w.add_argument("domain")
    w.add_argument("--concurrency", type=int, default=32)
    w.add_argument("--vt", type=int, default=5)
    s = sub.add_parser("sender")
    s.add_argument("dsn")
    s.add_argument("domain")
    s.add_argument("reply_queue")
    s.add_argument("base", help="hex: the high bits of every id")
    s.add_argument("--rate", type=int, default=200)
    s.add_argument("--batch-every", type=int, default=5)
    s.add_argument("--call-timeout", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    return asyncio.run(work(args) if args.role == "worker" else send(args))


if __name__ == "__main__":
    sys.exit(main())
