"""`python -m commandbus.console`: serve the operator console (see `commandbus.console`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from commandbus.console import serve
from commandbus.exceptions import CommandBusError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m commandbus.console", description="the rcmd operator console"
    )
    p.add_argument("--dsn", default=None, help="PostgreSQL URL (default: $DATABASE_URL)")
    p.add_argument(
        "--embedded", action="store_true", help="start a private PostgreSQL for this run"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--read-only", action="store_true", help="show everything, offer no action")
    p.add_argument(
        "--demo-worker",
        type=int,
        default=0,
        metavar="CONCURRENCY",
        help="also run an E2E demo worker in this process with this concurrency",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve(
            dsn=args.dsn or os.environ.get("DATABASE_URL") or None if not args.embedded else None,
            embedded=args.embedded,
            host=args.host,
            port=args.port,
            read_only=args.read_only,
            demo_worker=args.demo_worker,
        )
    except CommandBusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
