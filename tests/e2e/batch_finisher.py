"""A worker process that finishes batch commands (tests/integration/test_batches.py).

    python batch_finisher.py DSN DOMAIN [COUNT]

Runs one `Worker` for DOMAIN with a handler for command type `Finish` that returns
{"pid": <this pid>}. After COUNT commands (default 1) it stops gracefully, so their outcomes
are flushed, prints `DONE <pid>` and exits 0. stdout carries only that line; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from psycopg_pool import AsyncConnectionPool

from commandbus import Command, HandlerContext, HandlerRegistry, Worker

COMMAND_TYPE = "Finish"


async def main(dsn: str, domain: str, count: int) -> int:
    handled = 0
    enough = asyncio.Event()

    async def finish(command: Command, context: HandlerContext) -> dict[str, Any]:
        nonlocal handled
        handled += 1
        if handled >= count:
            enough.set()
        return {"pid": os.getpid()}

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)
    await pool.open(wait=True)
    try:
        registry = HandlerRegistry()
        registry.register(domain, COMMAND_TYPE, finish)
        worker = Worker(pool, domain, registry)
        run = asyncio.create_task(worker.run(concurrency=1, poll_interval=0.1))
        await enough.wait()
        await worker.stop(timeout=10)
        await run
    finally:
        await pool.close()
    sys.stdout.write(f"DONE {os.getpid()}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], count)))
