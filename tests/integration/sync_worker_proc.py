"""A SyncWorker process for tests/integration/test_sync.py's SIGTERM test.

    python sync_worker_proc.py DSN DOMAIN

Runs `SyncWorker.run(handle_signals=True)` in the main thread; the handler of `Slow` prints
`STARTED <command_id>`, sleeps 1 s and returns. After the run returns, prints `STOPPED` and
exits 0. No asyncio in this file.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from psycopg_pool import ConnectionPool

from commandbus import Command, HandlerContext, HandlerRegistry
from commandbus.sync import SyncWorker


def main() -> None:
    dsn, domain = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    registry = HandlerRegistry()

    @registry.handler(domain, "Slow")
    def slow(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        print(f"STARTED {cmd.command_id}", flush=True)
        time.sleep(1.0)
        return {"slept": 1.0}

    with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as pool:
        worker = SyncWorker(pool, domain, registry)
        print("READY", flush=True)
        worker.run(concurrency=2, poll_interval=0.05, handle_signals=True)
    print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
