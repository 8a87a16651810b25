"""The shim's upstream HTTP/1.1 connections: per-endpoint idle stacks on asyncio, framed by
the mesh's own sans-I/O ``meshlib.http.wire``.

Why not ``meshlib.http._async.pool.AsyncPool``: it speaks httpx (``httpx.Request`` streams in,
``httpx.Response`` out), and the shim needs to stream the app's request body in and the
upstream response body out without either object, keep an idle timeout shorter than the
servers' keep-alive, and know whether a failed exchange ran on a *reused* connection that
the server had closed while idle (below). The framing is not restated: request heads, chunk
encoding, response heads, body framing (HEAD, 1xx, 204, 304, chunked, length,
close-delimited) all come from ``wire.py``. To be consolidated with ``connections.py`` once
that module grows streaming bodies (noted in docs/design.md).

Errors are the httpx exceptions the library's own connections raise (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``WriteTimeout``, ``ReadError``,
``RemoteProtocolError``), so ``meshlib.http.attempt.result_from_error`` classifies them
exactly as it does for library calls and the ``error.type`` labels are the same.

Idle connections (Envoy ``idle_timeout``, Go ``IdleConnTimeout``): a connection idle longer
than ``idle_timeout`` is never reused; choose it below the keep-alive timeout of the servers
(Node.js 5 s, gunicorn 2 s, nginx 75 s) so the shim gives up a connection before the server
does. The race that remains (the server closes at the moment a request goes out: Envoy's
"503 UC") surfaces as :class:`StaleConnectionError`: the connection had served earlier
requests and failed before a single response byte; the driver then sends an idempotent,
replayable request once more on a new connection (as Go's ``net/http`` transport does).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

from meshlib.http.backends.aio import TLSTarget, check_server
from meshlib.http.wire import (
    END,
    LAST_CHUNK,
    NEED_DATA,
    BodyReader,
    encode_chunk,
    encode_head,
    framing,
    parse_head,
    take_head,
)
from meshlib.tls import handshake_refusal

#: ``(host, port)``, or ``(host, port, expected SPIFFE ID)`` for a mesh mTLS connection (a
#: TLS connection is never reused for clear text, nor for another destination identity)
Key = tuple[Any, ...]
_READ_HIGH = 1 << 20
_TIMED_OUT = object()


class StaleConnectionError(httpx.RemoteProtocolError):
    """A reused idle connection was closed by the server before any response byte."""


class _Conn(asyncio.Protocol):
    """One upstream connection: buffers bytes, wakes one waiting reader, flow control."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Key) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Any] | None = None
        self.eof = False
        self.reusable = True
        self.uses = 0
        self.idle_since = 0.0
        self.paused = False
        self.reading_paused = False
        self.drained: asyncio.Future[Any] | None = None
        self.tunnel: Any = None  # a tunnel.Tunnel after a 101: bytes go straight through

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        self.buf += data
        if len(self.buf) > _READ_HIGH and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        if self.tunnel is not None:
            self.tunnel.upstream_eof()
            return True  # half-close: keep sending the app's bytes
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.eof = True
        self._wake()
        self.resume_writing()
        if self.tunnel is not None:
            self.tunnel.upstream_lost()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.tunnel is not None:
            self.tunnel.upstream_drained()
        d = self.drained
        if d is not None and not d.done():
            d.set_result(None)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # used by the pool and the exchange
    def usable(self) -> bool:
        t = self.transport
        return (self.reusable and not self.eof and not self.buf and t is not None
                and not t.is_closing())

    async def fill(self, timeout: float | None) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        w = self.waiter = self.loop.create_future()
        handle = None if timeout is None else self.loop.call_later(timeout, _expire, w)
        try:
            await w
        finally:
            if handle is not None:
                handle.cancel()
        if w.result() is _TIMED_OUT:
            raise httpx.ReadTimeout(f"no response data from {self.key[0]}:{self.key[1]} "
                                    f"within {timeout}s")

    async def drain(self, timeout: float | None) -> None:
        d = self.drained = self.loop.create_future()
        handle = None if timeout is None else self.loop.call_later(timeout, _expire, d)
        try:
            await d
        finally:
            if handle is not None:
                handle.cancel()
        if d.result() is _TIMED_OUT:
            raise httpx.WriteTimeout(f"sending the request to {self.key[0]}:{self.key[1]} "
                                     "timed out")
        if self.transport is None or self.transport.is_closing():
            raise httpx.WriteError(f"connection to {self.key[0]}:{self.key[1]} lost while "
                                   "sending the request")

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            raise httpx.WriteError(f"connection to {self.key[0]}:{self.key[1]} lost while "
                                   "sending the request")
        t.write(data)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


class UpstreamResponse:
    """A response head with its body still on the connection: iterate :meth:`body`, then
    :meth:`release` (gives the connection back when the body was read to its end)."""

    __slots__ = ("status", "version", "headers", "reader", "conn", "pool", "read_timeout",
                 "released")

    def __init__(self, status: int, version: bytes, headers: list[tuple[bytes, bytes]],
                 reader: BodyReader, conn: _Conn, pool: UpstreamPool,
                 read_timeout: float | None) -> None:
        self.status = status
        self.version = version
        self.headers = headers
        self.reader = reader
        self.conn = conn
        self.pool = pool
        self.read_timeout = read_timeout
        self.released = False

    @property
    def status_code(self) -> int:
        """The status, under httpx's name (``meshlib.http.attempt.finish`` reads it)."""
        return self.status

    @property
    def has_body(self) -> bool:
        return not self.reader.done

    async def next_chunk(self) -> bytes | None:
        """The next decoded body chunk, or None at the end. A plain coroutine: the hot path
        (``outbound._relay``) avoids an async generator per response (the loop registers
        every async generator in a WeakSet and finalizes it)."""
        conn, reader = self.conn, self.reader
        while True:
            item = reader.next(conn.buf, conn.eof)
            if item is END:
                return None
            if item is not NEED_DATA:
                return item  # type: ignore[return-value]
            await conn.fill(self.read_timeout)

    async def body(self) -> AsyncIterator[bytes]:
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.reader.done and self.conn.reusable:
            self.pool.give_back(self.conn)
        else:
            self.conn.close()


class UpstreamPool:
    """Per-endpoint LIFO stacks of idle connections, with an idle timeout."""

    def __init__(self, *, max_idle: int = 64, idle_timeout: float = 4.0,
                 connect_timeout: float | None = 2.0) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._idle: dict[Key, deque[_Conn]] = {}
        self.opened = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def give_back(self, conn: _Conn) -> None:
        stack = self._idle.get(conn.key)
        if stack is None:
            stack = self._idle[conn.key] = deque()
        if len(stack) >= self.max_idle or not conn.usable():
            conn.close()
            return
        if conn.reading_paused:
            conn.reading_paused = False
            conn.transport.resume_reading()  # type: ignore[union-attr]
        conn.idle_since = time.monotonic()
        stack.append(conn)
        if self._sweeper is None and self.idle_timeout > 0:
            self._sweeper = conn.loop.call_later(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than the idle timeout (frees server sockets)."""
        self._sweeper = None
        limit = time.monotonic() - self.idle_timeout
        left = 0
        loop = None
        for stack in self._idle.values():
            while stack and stack[0].idle_since <= limit:
                stack.popleft().close()
            left += len(stack)
            if stack:
                loop = stack[0].loop
        if left and loop is not None:
            self._sweeper = loop.call_later(self.idle_timeout / 2, self._sweep)

    def _take_idle(self, key: Key) -> _Conn | None:
        stack = self._idle.get(key)
        if not stack:
            return None
        limit = time.monotonic() - self.idle_timeout
        while stack:
            c = stack.pop()
            if c.usable() and c.idle_since > limit:
                return c
            c.close()
        return None

    async def _connect(self, key: Key, timeout: float | None,
                       tls: TLSTarget | None = None) -> _Conn:
        """Open a connection; with ``tls`` complete a TLS 1.3 handshake with the newest client
        context and check the server's SPIFFE ID, exactly as the library's connections do
        (``meshlib.http.backends.aio.connect``: same ``meshlib.tls`` helpers, same errors)."""
        loop = asyncio.get_running_loop()
        try:
            if tls is None:
                coro = loop.create_connection(lambda: _Conn(loop, key), key[0], key[1])
            else:
                coro = loop.create_connection(lambda: _Conn(loop, key), key[0], key[1],
                                              ssl=tls[0], ssl_handshake_timeout=timeout)
            if timeout is None:
                _t, conn = await coro
            else:
                _t, conn = await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {key[0]}:{key[1]} timed out") from None
        except ssl.SSLError as exc:
            raise httpx.ConnectError(handshake_refusal(exc, f"{key[0]}:{key[1]}")) from exc
        except OSError as exc:
            raise httpx.ConnectError(f"connect to {key[0]}:{key[1]} failed: {exc}") from exc
        if tls is not None:
            check_server(_t, tls[1], key)
        self.opened += 1
        return conn

    async def request(self, host: str, port: int, method: str, target: bytes,
                      headers: list[tuple[bytes, bytes]], body: bytes | AsyncIterator[bytes],
                      timeout: float | None, *, fresh: bool = False,
                      tls: TLSTarget | None = None) -> UpstreamResponse:
        """Send one request. ``body``: the whole body (bytes; framed by the Content-Length
        or chunked header in ``headers``) or an async iterator of parts. ``timeout`` bounds
        the connect (with the pool's connect timeout), each write stall and each wait for
        response bytes. ``fresh``: never reuse an idle connection. ``tls``: speak mesh mTLS
        (``meshlib.http.mtls.tls_target``); idle TLS connections are pooled under
        ``(host, port, expected SPIFFE ID)`` and keep the context they were made with, so
        after a rotation only new connections use the new certificate."""
        key = (host, port) if tls is None else (host, port, tls[1])
        conn = None if fresh else self._take_idle(key)
        if conn is None:
            ct = self.connect_timeout
            if timeout is not None and (ct is None or timeout < ct):
                ct = timeout
            conn = await self._connect(key, ct, tls)
        reused = conn.uses > 0
        conn.uses += 1
        try:
            return await self._exchange(conn, method, target, headers, body, timeout, reused)
        except BaseException:
            conn.abort()
            raise

    async def _exchange(self, conn: _Conn, method: str, target: bytes,
                        headers: list[tuple[bytes, bytes]], body: bytes | AsyncIterator[bytes],
                        timeout: float | None, reused: bool) -> UpstreamResponse:
        parts, chunked, client_close = encode_head(method, target, headers)
        if isinstance(body, bytes | bytearray):
            if chunked:
                parts.append((encode_chunk(body) if body else b"") + LAST_CHUNK)
            elif body:
                parts.append(body)
            conn.write(b"".join(parts))
        else:
            conn.write(b"".join(parts))
            async for part in body:
                if part:
                    conn.write(encode_chunk(part) if chunked else part)
                    if conn.paused:
                        await conn.drain(timeout)
            if chunked:
                conn.write(LAST_CHUNK)
        try:
            while True:
                head = take_head(conn.buf, conn.eof)
                if head is None:
                    await conn.fill(timeout)
                    continue
                status, version, resp_headers = parse_head(head)
                if 100 <= status < 200 and status != 101:
                    continue
                break
        except httpx.RemoteProtocolError as exc:
            if reused and conn.eof and not conn.buf and "without sending" in str(exc):
                raise StaleConnectionError(
                    f"{conn.key[0]}:{conn.key[1]} closed a reused idle connection before "
                    "answering") from exc
            raise
        reader, server_close = framing(method, status, version, resp_headers)
        if server_close or client_close:
            conn.reusable = False
        return UpstreamResponse(status, version, resp_headers, reader, conn, self, timeout)

    def idle_count(self) -> int:
        return sum(len(s) for s in self._idle.values())

    def close(self) -> None:
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for conn in stack:
                conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
