"""A TCP proxy that injects network faults between the workers and PostgreSQL.

    proxy = FaultProxy("127.0.0.1", server_port).start()
    worker_dsn = proxy.dsn(server_dsn)   # same URL, the proxy's host and port
    proxy.freeze()                       # connections open now go silent (not closed)
    proxy.add_latency(20)                # every chunk forwarded 20 ms later, both directions
    proxy.reset()                        # no latency; the frozen connections are reset (RST)
    proxy.close()

The proxy runs an asyncio loop in a daemon thread; the methods above are called from any other
thread and return once the loop applied them.

``freeze()`` is what a stuck pgbouncer or cloud SQL proxy, a NAT or load-balancer idle drop or a
failover without resets looks like to a client: the connections open at that moment stop
forwarding in both directions (nothing more is read from or written to either side) but stay
open, so neither peer sees an error; connections opened afterwards pass normally.
``add_latency(ms)`` delays every chunk read from either side by ``ms`` (order kept) on every
connection, the open ones and the new ones, until ``add_latency(0)`` or ``reset()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

#: bytes read per chunk (a PostgreSQL message batch fits; larger ones come in several chunks)
CHUNK = 65536


class _Link:
    """One proxied connection: the client side and the upstream (server) side."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.frozen = False
        self.closed = asyncio.Event()

    def abort(self) -> None:
        """Close both sides at once with a reset (no FIN handshake)."""
        for writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self.closed.set()


class FaultProxy:
    """A TCP proxy to ``target_host:target_port`` listening on ``listen_host`` (free port)."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._latency = 0.0  # seconds
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        #: connections accepted since start (for diagnostics)
        self.accepted = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, self.listen_host, 0)
                )
                self._port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def close(self) -> None:
        """Stop listening, reset every connection and stop the loop thread (idempotent)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.abort()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)
            self._links.clear()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start() if self._loop is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    def dsn(self, dsn: str) -> str:
        """``dsn`` (a ``postgresql://`` URL) with the proxy's host and port."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.listen_host}:{self.port}"))

    # -- faults ----------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not started")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    def freeze(self) -> int:
        """Stop forwarding on every connection open now, without closing it; new connections
        pass. Returns how many connections were frozen."""

        def apply() -> int:
            count = 0
            for link in self._links:
                if not link.frozen:
                    link.frozen = True
                    count += 1
            return count

        return self._call(apply)

    def add_latency(self, ms: float) -> None:
        """Forward every chunk, both directions, ``ms`` milliseconds after it was read (on open
        and new connections; ``0`` removes it)."""
        if ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {ms}")

        def apply() -> None:
            self._latency = ms / 1000.0

        self._call(apply)

    def reset(self) -> int:
        """Back to a plain proxy: no latency, the frozen connections closed with a reset.
        Returns how many frozen connections were reset."""

        def apply() -> int:
            self._latency = 0.0
            frozen = [link for link in self._links if link.frozen]
            for link in frozen:
                link.abort()
                self._links.discard(link)
            return len(frozen)

        return self._call(apply)

    @property
    def connections(self) -> tuple[int, int]:
        """(open connections, of which frozen)."""
        return self._call(lambda: (len(self._links), sum(ln.frozen for ln in self._links)))

    # -- forwarding ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()  # the server is down: the client sees a reset
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(link, reader, up_writer), self._pump(link, up_reader, writer)
            )
        finally:
            if link.frozen:
                # frozen: stay open (silent, in _links) until reset() or close() aborts it
                await link.closed.wait()
            self._links.discard(link)
            link.abort()

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Forward reader -> writer until EOF, an error, or the link freezing."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def write() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    return
                due, data = item
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if link.frozen:
                    return
                writer.write(data)
                await writer.drain()

        writer_task = asyncio.create_task(write())
        try:
            while not link.frozen and not writer_task.done():
                data = await reader.read(CHUNK)
                if not data or link.frozen:
                    break
                queue.put_nowait((time.monotonic() + self._latency, data))
        except (ConnectionError, OSError):
            pass
        finally:
            if link.frozen:
                writer_task.cancel()
            else:
                queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await writer_task
            if not link.frozen:
                # one direction ended: end the other one too
                link.abort()
