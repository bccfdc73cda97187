"""Connection limits and slow-client timeouts for envtune's aiohttp servers.

aiohttp's server accepts every connection and waits as long as a client likes for its headers, so a
few hundred slow or idle connections (slowloris) exhaust the process's file descriptors, and then
nobody, ``/health`` included, can connect. ``ConnectionGuard`` sits between the listening socket and
aiohttp's request handler:

- **a connection limit** (``ServerLimits.max_connections``, lowered to what the process's file
  limit leaves room for): at the limit, a new connection replaces the connection that has been idle
  the longest (no request in progress: a slowloris client is always idle), so a real client still
  gets through; only when every connection is busy is the new one closed;
- **an idle timeout** (``idle_timeout_s``): a connection with no request in progress (waiting for
  headers, or kept alive between requests) is closed after that long, checked by one periodic sweep;
- **request tracking** through ``middleware``, which marks a connection busy while a handler runs.

Body read timeouts are the handlers' (``read_body``). Left out: per-client (per-IP) quotas; a
reverse proxy does that better.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from envtune.runtime.engines.settings import ServerLimits

log = structlog.get_logger(__name__)

_FD_RESERVE = 64
"""File descriptors left for everything but client connections (model files, logs, threads...)."""


@dataclass(frozen=True, slots=True)
class GuardStatistics:
    """A snapshot of the guard."""

    open_connections: int
    """Connections open now."""
    busy_connections: int
    """Connections with a request in progress."""
    connection_limit: int
    """The limit in force (the configured one, lowered to fit the file limit)."""
    evicted_idle: int
    """Idle connections closed to make room for a new one."""
    refused: int
    """New connections closed because every open one was busy."""
    timed_out: int
    """Connections closed by the idle timeout."""


def connection_limit(configured: int) -> int:
    """``configured``, lowered so that connections can never exhaust the process's file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, soft - _FD_RESERVE))


class _Connection:
    __slots__ = ("busy", "idle_since", "protocol", "transport")

    def __init__(self, protocol: _GuardedProtocol, transport: asyncio.Transport, now: float) -> None:
        self.protocol = protocol
        self.transport = transport
        self.busy = 0
        self.idle_since = now


class _GuardedProtocol(asyncio.Protocol):
    """Forwards everything to aiohttp's request handler, after the guard admitted the connection."""

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self._guard = guard
        self._inner = inner
        self._admitted = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._admitted = self._guard._admit(self, transport)
        if self._admitted:
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._admitted:
            result: bool | None = self._inner.eof_received()
            return result
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            assert self._transport is not None
            self._guard._forget(self._transport)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()


class ConnectionGuard:
    """Admits, tracks and times out the connections of one aiohttp server (see the module docstring)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.limit = connection_limit(limits.max_connections)
        self._connections: dict[asyncio.Transport, _Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._server: asyncio.Server | None = None
        self._evicted = 0
        self._refused = 0
        self._timed_out = 0

    async def listen(self, runner: web.AppRunner, host: str, port: int) -> int:
        """Serve ``runner``'s application on ``host:port`` (0: any free port); returns the port."""
        self._loop = asyncio.get_running_loop()
        aiohttp_server = runner.server
        assert aiohttp_server is not None, "runner.setup() first"
        self._server = await self._loop.create_server(
            lambda: _GuardedProtocol(self, aiohttp_server()),
            host,
            port,
            reuse_address=True,
            backlog=socket.SOMAXCONN,  # a burst of connects waits here, not in failed connects
        )
        self._schedule_sweep()
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening (open connections are closed by the runner's cleanup)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def statistics(self) -> GuardStatistics:
        return GuardStatistics(
            open_connections=len(self._connections),
            busy_connections=sum(1 for c in self._connections.values() if c.busy),
            connection_limit=self.limit,
            evicted_idle=self._evicted,
            refused=self._refused,
            timed_out=self._timed_out,
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Marks the request's connection busy while the handler runs (it is never timed out then)."""
        connection = self._connections.get(request.transport) if request.transport is not None else None
        if connection is not None:
            connection.busy += 1
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            if connection is not None:
                connection.busy -= 1
                connection.idle_since = asyncio.get_running_loop().time()

    # --- internals -------------------------------------------------------------------------------

    def _admit(self, protocol: _GuardedProtocol, transport: asyncio.Transport) -> bool:
        now = asyncio.get_running_loop().time()
        if len(self._connections) >= self.limit:
            idle = [c for c in self._connections.values() if not c.busy]
            if not idle:
                self._refused += 1
                transport.abort()
                return False
            oldest = min(idle, key=lambda c: c.idle_since)
            self._evicted += 1
            self._drop(oldest)
        self._connections[transport] = _Connection(protocol, transport, now)
        return True

    def _forget(self, transport: asyncio.Transport) -> None:
        self._connections.pop(transport, None)

    def _drop(self, connection: _Connection) -> None:
        self._connections.pop(connection.transport, None)
        connection.transport.abort()

    def _schedule_sweep(self) -> None:
        assert self._loop is not None
        period = min(1.0, self.limits.idle_timeout_s / 4)
        self._sweeper = self._loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        assert self._loop is not None
        deadline = self._loop.time() - self.limits.idle_timeout_s
        stale = [c for c in self._connections.values() if not c.busy and c.idle_since < deadline]
        for connection in stale:
            self._timed_out += 1
            self._drop(connection)
        if stale:
            log.info("http_idle_connections_closed", count=len(stale))
        self._schedule_sweep()


async def read_body(request: web.Request, limits: ServerLimits) -> bytes:
    """The request body, read within ``limits.body_timeout_s`` (HTTP 408 when the client is slower)."""
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text='{"error": "request body not received in time"}', content_type="application/json"
        ) from None
