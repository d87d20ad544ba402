"""A process reply router process for the crash test of process managers
(tests/e2e/test_process_crash.py), and the two-step saga it runs.

    python process_router.py DSN MODE VISIBILITY_TIMEOUT

Runs a `ProcessReplyRouter` for the saga until SIGTERM, then prints `STOPPED` and exits 0.
Modes:
    work   builds every step's command at once
    hang   prints `BUILDING <process_id>` when it builds the second step's command (inside the
           transaction of the first step's reply: the reply recorded, nothing committed) and
           then hangs there, to be killed

stdout carries only these lines (flushed at once); logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Self

from psycopg_pool import AsyncConnectionPool

from commandbus import CommandBus, Reply
from commandbus.process import (
    BaseProcessManager,
    PostgresProcessRepository,
    ProcessCommand,
    ProcessReplyRouter,
)

DOMAIN = "crashsaga"
REPLY_QUEUE = "crashsaga__process_replies"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Step(StrEnum):
    FIRST = "FIRST"
    SECOND = "SECOND"


@dataclass
class State:
    n: int
    first: Any = None
    second: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "first": self.first, "second": self.second}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


class TwoSteps(BaseProcessManager[State, Step]):
    hang = False

    @property
    def process_type(self) -> str:
        return "TwoSteps"

    @property
    def domain(self) -> str:
        return DOMAIN

    @property
    def state_class(self) -> type[State]:
        return State

    def create_initial_state(self, initial_data: dict[str, Any]) -> State:
        return State(n=initial_data["n"])

    def get_first_step(self, state: State) -> Step:
        return Step.FIRST

    async def build_command(self, step: Step, state: State) -> ProcessCommand[Any]:
        if step == Step.SECOND and self.hang:
            say(f"BUILDING {state.n}")
            await asyncio.Event().wait()
        return ProcessCommand(command_type=f"Step{step.title()}", data={"n": state.n})

    def update_state(self, state: State, step: Step, reply: Reply) -> None:
        setattr(state, str(step).lower(), reply.data)

    def get_next_step(self, current_step: Step, reply: Reply, state: State) -> Step | None:
        return Step.SECOND if current_step == Step.FIRST else None


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("mode", choices=("work", "hang"))
    parser.add_argument("visibility_timeout", type=int)
    args = parser.parse_args()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(args.dsn, min_size=1, max_size=4,
                                                         open=False)  # fmt: skip
    await pool.open(wait=True)
    bus = CommandBus(pool)
    try:
        repo = PostgresProcessRepository(pool)
        saga = TwoSteps(bus, repo, REPLY_QUEUE, pool)
        saga.hang = args.mode == "hang"
        router = ProcessReplyRouter(pool, repo, {"TwoSteps": saga}, REPLY_QUEUE, DOMAIN,
                                    visibility_timeout=args.visibility_timeout)  # fmt: skip
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(router.stop(5)))
        await router.run(concurrency=2, poll_interval=0.1)
        say("STOPPED")
    finally:
        await bus.close()
        await pool.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")  # fmt: skip
    sys.exit(asyncio.run(main()))
