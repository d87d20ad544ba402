"""Delivers results of native (Rust) calls to asyncio.

A native call spawns its work on the Rust runtime and returns a token at once. When the work
ends, a tokio thread stores the result as plain Rust data and writes one byte to a socket this
event loop watches; the reader callback below then takes every ready result (converted to
Python objects on this thread) and resolves the matching futures. Tokio threads never take the
GIL or hold Python objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import weakref
from collections.abc import Callable
from typing import Any

from commandbus import _native


class _LoopBridge:
    __slots__ = ("__weakref__", "_completions", "_futures", "_sock")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._completions = _native.Completions()
        self._sock = socket.socket(fileno=self._completions.take_reader_fd())
        self._sock.setblocking(False)
        self._futures: dict[int, asyncio.Future[Any]] = {}
        loop.add_reader(self._sock.fileno(), self._drain)
        # Close the socket with the loop (no reference to the loop is kept here).
        weakref.finalize(loop, self._sock.close)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._sock.recv(65536):
                pass
        for token, ok, value in self._completions.take():
            fut = self._futures.pop(token, None)
            if fut is None or fut.done():
                continue  # the caller went away (cancelled); Rust-side state stays consistent
            if ok:
                fut.set_result(value)
            elif isinstance(value, BaseException):
                fut.set_exception(value)
            else:  # pragma: no cover - the native side always sends an exception object
                fut.set_exception(RuntimeError(f"native call failed: {value!r}"))

    def call(
        self, loop: asyncio.AbstractEventLoop, start: Callable[[_native.Completions], int]
    ) -> asyncio.Future[Any]:
        token = start(self._completions)
        fut: asyncio.Future[Any] = loop.create_future()
        self._futures[token] = fut
        return fut


_bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBridge] = (
    weakref.WeakKeyDictionary()
)


def call(start: Callable[[_native.Completions], int]) -> asyncio.Future[Any]:
    """Start a native call on the running loop and return the future of its result.

    `start` receives the loop's `Completions` and returns the call's token, e.g.
    `await call(native.next_batch)` or `await call(lambda c: native.receive(c, 64, 30))`.
    """
    loop = asyncio.get_running_loop()
    bridge = _bridges.get(loop)
    if bridge is None:
        bridge = _bridges[loop] = _LoopBridge(loop)
    return bridge.call(loop, start)
