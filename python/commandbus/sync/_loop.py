"""A private asyncio event loop in a daemon thread: how the sync API's blocking calls reach
the async machinery (the Rust engine's results arrive on an asyncio loop, `_bridge.py`).
The calling thread blocks on a `concurrent.futures.Future`, which waits without the GIL."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def _in_context(coro: Coroutine[Any, Any, T], context: contextvars.Context) -> T:
    # Cancelling the waiting task cancels the inner one too.
    return await asyncio.get_running_loop().create_task(coro, context=context)


class LoopThread:
    """An event loop running in its own daemon thread until `close()`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def run(self, coro: Coroutine[Any, Any, T], *, caller_context: bool = False) -> T:
        """Run `coro` on the loop; block the calling thread until it returns (or raises).
        With `caller_context`, `coro` runs in a copy of the calling thread's context variables
        (one more task: the sync bus asks for it only when sends carry a trace context)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a sync API call cannot be made from its own event-loop thread")
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("this sync object is closed")
        if caller_context:
            coro = _in_context(coro, contextvars.copy_context())
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Stop the loop (tasks still pending are cancelled) and wait for its thread."""
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join()


__all__ = ["LoopThread"]
