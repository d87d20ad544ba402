"""A worker process for the crash tests (tests/e2e/test_crash.py).

    python crash_worker.py DSN DOMAIN MODE CONCURRENCY VISIBILITY_TIMEOUT
        [--release FILE] [--marker FILE] [--poll SECONDS]

Runs one `Worker` for DOMAIN (handler for command type `Crash`) until SIGTERM or
SIGINT, then prints `STATS {json}` (the worker's counters plus `handled`) and exits 0.

Modes (what the handler does):
    work     prints `DONE <command_id>` and returns {"mode": "work", "pid": <pid>}
    hang     prints `STARTED <command_id>` and sleeps forever
    late     prints `STARTED <command_id>`, waits until the --release file exists, prints
             `FINISHED <command_id>` and returns {"mode": "late", "pid": <pid>}
    suicide  appends `<command_id>` to the --marker file and SIGKILLs its own process

stdout carries only these lines (flushed at once); logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from commandbus import Command, HandlerContext, HandlerRegistry, Worker

MODES = ("work", "hang", "late", "suicide")
COMMAND_TYPE = "Crash"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("domain")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("concurrency", type=int)
    parser.add_argument("visibility_timeout", type=int)
    parser.add_argument("--release", type=Path)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--poll", type=float, default=0.2)
    args = parser.parse_args()
    handled = 0

    async def handle(command: Command, context: HandlerContext) -> dict[str, Any] | None:
        nonlocal handled
        cid = command.command_id
        if args.mode == "work":
            handled += 1
            say(f"DONE {cid}")
            return {"mode": "work", "pid": os.getpid()}
        if args.mode == "hang":
            say(f"STARTED {cid}")
            await asyncio.Event().wait()
            return None
        if args.mode == "late":
            say(f"STARTED {cid}")
            assert args.release is not None
            while not args.release.exists():  # noqa: ASYNC110 - set by another process
                await asyncio.sleep(0.05)
            handled += 1
            say(f"FINISHED {cid}")
            return {"mode": "late", "pid": os.getpid()}
        assert args.marker is not None
        with args.marker.open("a") as f:
            f.write(f"{cid}\n")
        os.kill(os.getpid(), signal.SIGKILL)
        return None

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        args.dsn, min_size=1, max_size=2, open=False
    )
    await pool.open(wait=True)
    try:
        registry = HandlerRegistry()
        registry.register(args.domain, COMMAND_TYPE, handle)
        worker = Worker(pool, args.domain, registry, visibility_timeout=args.visibility_timeout)
        await worker.run(concurrency=args.concurrency, poll_interval=args.poll, handle_signals=True)
        say("STATS " + json.dumps({**worker.stats(), "handled": handled}))
    finally:
        await pool.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    sys.exit(asyncio.run(main()))
