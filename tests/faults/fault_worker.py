"""A worker process for the fault tests (tests/faults/).

    python fault_worker.py DSN DOMAIN [--concurrency N] [--vt S] [--call-timeout S]
        [--stop-timeout S] [--handler-ms MS]

Runs one `Worker` for DOMAIN (handler for command type `Fault`: sleeps --handler-ms, returns
{"pid": <pid>}) until SIGTERM or SIGINT (graceful stop within --stop-timeout), then prints
`STATS {json}` (the worker's counters plus `handled`) and exits 0. Prints `READY` once
running. stdout carries only these lines; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from psycopg_pool import AsyncConnectionPool

from commandbus import Command, HandlerContext, HandlerRegistry, Worker

COMMAND_TYPE = "Fault"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("domain")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--vt", type=int, default=30)
    parser.add_argument("--call-timeout", type=float, default=10.0)
    parser.add_argument("--stop-timeout", type=float, default=30.0)
    parser.add_argument("--handler-ms", type=float, default=2.0)
    args = parser.parse_args()
    handled = 0

    async def handle(command: Command, context: HandlerContext) -> dict[str, Any]:
        nonlocal handled
        await asyncio.sleep(args.handler_ms / 1000)
        handled += 1
        return {"pid": os.getpid()}

    # The worker only takes the pool's conninfo; it is never opened.
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(args.dsn, open=False)
    registry = HandlerRegistry()
    registry.register(args.domain, COMMAND_TYPE, handle)
    worker = Worker(
        pool, args.domain, registry, visibility_timeout=args.vt, call_timeout=args.call_timeout
    )
    asyncio.get_running_loop().call_later(0.5, say, "READY")
    await worker.run(
        concurrency=args.concurrency,
        poll_interval=0.5,
        handle_signals=True,
        signal_stop_timeout=args.stop_timeout,
    )
    say("STATS " + json.dumps({**worker.stats(), "handled": handled}))
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    sys.exit(asyncio.run(main()))
