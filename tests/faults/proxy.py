"""A TCP proxy for fault tests: what a stuck pgbouncer or cloud SQL proxy, a NAT or
load-balancer idle drop, or a failover without resets looks like to a client.

    proxy = FaultProxy("127.0.0.1", 5432).start()   # listens on 127.0.0.1:<proxy.port>
    dsn = proxy.dsn(database_url)                   # the same DSN, through the proxy
    proxy.freeze()          # connections open now stop forwarding, stay open; new ones pass
    proxy.add_latency(50)   # every chunk forwarded from now on waits 50 ms (0: none)
    proxy.thaw()            # frozen connections forward again (what they held is delivered)
    proxy.reset()           # no faults: frozen connections are closed, no latency
    proxy.stop()            # (or close(); also a context manager)

`freeze(direction)`: "both" (default) stops both directions; "to_client" only the answers
(requests reach the server, which runs and commits them, and the client never hears back: a
commit whose outcome is unknown); "to_server" only the requests. A frozen direction stops
reading its source socket, so what the peer sends waits in kernel buffers and in the proxy:
nothing is lost, nothing is closed, the peer's TCP stack sees a live connection.

The proxy runs its own event loop in a daemon thread; every method is thread-safe and may be
called from sync or async code (it never blocks on the proxied traffic). One proxy serves any
number of processes (worker subprocesses connect to `port`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

Direction = Literal["both", "to_client", "to_server"]


@dataclass
class _Pipe:
    """One direction of one proxied connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: set while this direction forwards
    running: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Conn:
    to_server: _Pipe
    to_client: _Pipe
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def pipes(self, direction: Direction) -> list[_Pipe]:
        if direction == "to_client":
            return [self.to_client]
        if direction == "to_server":
            return [self.to_server]
        return [self.to_server, self.to_client]

    @property
    def frozen(self) -> bool:
        return not (self.to_server.running.is_set() and self.to_client.running.is_set())

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for pipe in (self.to_server, self.to_client):
            with contextlib.suppress(Exception):
                pipe.writer.transport.abort()
                pipe.writer.close()


class FaultProxy:
    """A TCP proxy to `target_host:target_port` whose connections can be frozen or slowed."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.latency_s = 0.0
        #: connections accepted so far
        self.accepted = 0
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None

    @classmethod
    def for_dsn(cls, dsn: str) -> FaultProxy:
        """A proxy to the host and port of a `postgresql://` URL (TCP only)."""
        parts = urlsplit(dsn)
        if not parts.hostname or parts.hostname.startswith("/"):
            raise ValueError(f"a TCP host is needed to proxy {parts.hostname!r}")
        return cls(parts.hostname, parts.port or 5432)

    def dsn(self, dsn: str) -> str:
        """`dsn` (a `postgresql://` URL) with its host and port replaced by this proxy's."""
        parts = urlsplit(dsn)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@" if auth else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.host}:{self.port}"))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    close = stop

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------

    def freeze(self, direction: Direction = "both") -> int:
        """Stop forwarding `direction` on the connections open now, without closing them;
        connections opened later pass. Returns how many connections were frozen."""

        async def freeze() -> int:
            for conn in self._conns:
                for pipe in conn.pipes(direction):
                    pipe.running.clear()
            return len(self._conns)

        return self._call(freeze())

    def thaw(self) -> None:
        """Frozen connections forward again."""

        async def thaw() -> None:
            for conn in self._conns:
                conn.to_server.running.set()
                conn.to_client.running.set()

        self._call(thaw())

    def add_latency(self, ms: float) -> None:
        """Every chunk forwarded from now on, either way, waits `ms` milliseconds (on open and
        new connections; `0` removes it)."""
        if ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {ms}")

        async def set_latency() -> None:
            self.latency_s = ms / 1000.0

        self._call(set_latency())

    def reset(self) -> int:
        """No faults any more: frozen connections are closed (as a NAT that dropped them would,
        eventually), latency back to 0. Returns how many connections were closed."""

        async def reset() -> int:
            self.latency_s = 0.0
            frozen = [c for c in self._conns if c.frozen]
            for conn in frozen:
                conn.close()
                self._conns.discard(conn)
            return len(frozen)

        return self._call(reset())

    @property
    def connections(self) -> tuple[int, int]:
        """(open connections, of which frozen)."""

        async def count() -> tuple[int, int]:
            return len(self._conns), sum(c.frozen for c in self._conns)

        return self._call(count())

    @property
    def open_connections(self) -> int:
        async def count() -> int:
            return len(self._conns)

        return self._call(count())

    # -- inside the proxy's loop -------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for conn in self._conns for t in conn.tasks]
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0.05)  # transports finish closing on this loop

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        conn = _Conn(_Pipe(client_r, server_w), _Pipe(server_r, client_w))
        conn.to_server.running.set()
        conn.to_client.running.set()
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, conn.to_server)),
            asyncio.create_task(self._pump(conn, conn.to_client)),
        ]

    async def _pump(self, conn: _Conn, pipe: _Pipe) -> None:
        try:
            while True:
                await pipe.running.wait()
                data = await pipe.reader.read(65536)
                if not data:
                    break
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                # Frozen while reading: hold the chunk until thawed (or closed).
                await pipe.running.wait()
                pipe.writer.write(data)
                await pipe.writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        # One side ended: end the connection (unless it is frozen: a frozen connection is
        # only ended by reset() or stop()).
        if not conn.frozen:
            conn.close()
            self._conns.discard(conn)


__all__ = ["Direction", "FaultProxy"]
