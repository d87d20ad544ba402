"""Long console actions (bulk generation, bulk TSQ actions) run as tasks of the server's event
loop; pages poll their progress. Kept in memory: a restart forgets them (the database keeps
what they did)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: Finished jobs kept for their pages.
KEEP = 50

Progress = Callable[[int], None]


@dataclass
class Job:
    """One long action: `done` of `total` so far; `state` running, done or failed."""

    id: int
    title: str
    total: int
    operator: str
    done: int = 0
    state: str = "running"
    error: str | None = None
    summary: str | None = None
    link: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def percent(self) -> float:
        return 100.0 if self.total <= 0 else min(100.0, 100.0 * self.done / self.total)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def running(self) -> bool:
        return self.state == "running"


class Jobs:
    """The jobs of one console process."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self,
        title: str,
        total: int,
        operator: str,
        run: Callable[[Job, Progress], Awaitable[str | None]],
    ) -> Job:
        """Start `run(job, progress)` in a task; its return value is the job's summary."""
        job = Job(id=next(self._ids), title=title, total=total, operator=operator)
        self._jobs[job.id] = job

        def progress(done: int) -> None:
            job.done = done

        async def body() -> None:
            try:
                job.summary = await run(job, progress)
                job.state = "done"
            except Exception as exc:  # shown on the job's page
                logger.exception("console job %d (%s) failed", job.id, title)
                job.state = "failed"
                job.error = f"{type(exc).__name__}: {exc}"
            finally:
                job.finished = time.monotonic()

        task = asyncio.create_task(body(), name=f"rcmd-console-job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._trim()
        return job

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def recent(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: -j.id)

    def _trim(self) -> None:
        done = [j for j in self._jobs.values() if not j.running]
        for j in sorted(done, key=lambda j: j.id)[: max(0, len(done) - KEEP)]:
            del self._jobs[j.id]

    async def close(self) -> None:
        """Cancel running jobs (server shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
