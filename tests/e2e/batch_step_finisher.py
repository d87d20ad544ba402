"""A process that finishes batch commands with the step API (test_batch_rule.py).

    python batch_step_finisher.py DSN DOMAIN BATCH_ID COUNT

Registers its own completion callback for the batch (`register_batch_callback(..., pool=)`),
then claims and completes COUNT commands of DOMAIN with `Worker.receive()` / `complete()`. It
prints `DONE <pid> <callbacks run when the last complete() returned> <callbacks run 1 s
later>` and exits 0. stdout carries only that line; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from commandbus import BatchMetadata, Worker
from commandbus import batch as batch_mod
from commandbus.batch import register_batch_callback


async def main(dsn: str, domain: str, batch_id: UUID, count: int) -> int:
    batch_mod.LISTENER_POLL_INTERVAL = 0.1  # a poll that could fire it again runs meanwhile
    fired: list[BatchMetadata] = []

    async def on_complete(batch: BatchMetadata) -> None:
        fired.append(batch)

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)
    await pool.open(wait=True)
    try:
        await register_batch_callback(domain, batch_id, on_complete, pool=pool)
        worker = Worker(pool, domain)
        try:
            done = 0
            while done < count:
                received = await worker.receive()
                if not received:
                    await asyncio.sleep(0.05)
                    continue
                await worker.complete(received[0], {"pid": os.getpid()})
                done += 1
            at_return = len(fired)
        finally:
            await worker.close()
        await asyncio.sleep(1.0)
        later = len(fired)
    finally:
        await pool.close()
    sys.stdout.write(f"DONE {os.getpid()} {at_return} {later}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], UUID(sys.argv[3]), int(sys.argv[4]))))
