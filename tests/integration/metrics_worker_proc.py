"""A worker process for tests/integration/test_metrics.py's multiprocess test.

    PROMETHEUS_MULTIPROC_DIR=DIR python metrics_worker_proc.py DSN DOMAIN

Runs an instrumented async `Worker` (the handlers of test_metrics) until SIGTERM; prints
`READY` once the worker is about to run.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from psycopg_pool import AsyncConnectionPool
from test_metrics import FAST, _registry

from commandbus import Worker
from commandbus.metrics import instrument


async def main() -> None:
    dsn, domain = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2) as pool:
        worker = Worker(pool, domain, _registry(domain), retry_policy=FAST)
        instrument(worker)
        print("READY", flush=True)
        await worker.run(concurrency=4, poll_interval=0.05, handle_signals=True)


if __name__ == "__main__":
    asyncio.run(main())
