"""Per-endpoint pools of the mesh's own HTTP/1.1 connections, and their response bodies.

Why not httpcore: its async connection pool collapses under concurrency (encode/httpx#3215),
and even a bare httpcore connection spends most of a request in anyio cancel scopes and h11's
generic event machinery. A client that only speaks HTTP/1.1 over plain TCP to mesh endpoints
needs far less: the framing rules live, sans I/O, in ``meshlib.http.wire``; the connections
(``meshlib.http.backends``) only move bytes. Measured here with 16 concurrent tasks against a
local nginx: about 16,000 req/s for the async connection alone, against about 500 req/s for
httpx's async client.

Idle connections live in a LIFO stack per endpoint (the most recently used is the warmest and
the least likely to have been closed by the server); a connection that the server closed while
idle is detected before reuse (``usable()``) and dropped. Stack operations do not block or
await, so no lock is needed (``deque.append``/``pop`` are atomic for threads; asyncio runs one
task at a time).

Errors are raised as the httpx exceptions httpx's own transport raises (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``WriteTimeout``, ``ReadError``, ``WriteError``,
``RemoteProtocolError``), so retry classification is the same for every transport. Timeouts
follow httpx's per-phase model: ``connect``, ``write`` (each wait to send), and ``read`` (each
wait for response bytes may last at most ``read`` seconds).
"""

from __future__ import annotations

from collections import abc, deque
from typing import Any

import httpx

from meshlib.http.backends.aio import AsyncConnection, TLSTarget, connect
from meshlib.http.wire import (
    END,
    LAST_CHUNK,
    NEED_DATA,
    BodyReader,
    encode_chunk,
    framing,
    parse_head,
    request_bytes,
    take_head,
)


class AsyncBody(httpx.AsyncByteStream):
    """A response body read from its connection; closing it gives the connection back to
    the pool when the body was read to its end and the connection may be reused."""

    __slots__ = ("conn", "pool", "reader", "timeout", "closed")

    def __init__(self, conn: AsyncConnection, pool: AsyncPool, reader: BodyReader,
                 timeout: float | None) -> None:
        self.conn = conn
        self.pool = pool
        self.reader = reader
        self.timeout = timeout
        self.closed = False

    async def __aiter__(self) -> abc.AsyncIterator[bytes]:
        conn, reader = self.conn, self.reader
        while True:
            item = reader.next(conn.buf, conn.eof)
            if item is END:
                return
            if item is NEED_DATA:
                await conn.fill(self.timeout)
                continue
            yield item  # type: ignore[misc]

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.reader.done and self.conn.reusable:
            self.pool.give_back(self.conn)
        else:
            self.conn.close()


class AsyncPool:
    """Per-endpoint stacks of idle connections (no locks: see the module docstring)."""

    def __init__(self, *, max_idle: int = 64) -> None:
        self.max_idle = max_idle
        self._idle: dict[tuple[Any, ...], deque[AsyncConnection]] = {}
        self.opened = 0

    def give_back(self, conn: AsyncConnection) -> None:
        stack = self._idle.get(conn.key)
        if stack is None:
            stack = self._idle.setdefault(conn.key, deque())
        if len(stack) >= self.max_idle or not conn.park():
            conn.close()
        else:
            stack.append(conn)

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        stream: Any,
        timeouts: dict[str, float | None] | None,
        on_connection: abc.Callable[[AsyncConnection], None] | None = None,
        tls: TLSTarget | None = None,
    ) -> httpx.Response:
        """Send one request; ``on_connection`` (hedged attempts of the sync driver) is handed
        the connection before the exchange, so that another thread can cancel it. ``tls``
        (``(context, expected SPIFFE ID)``): use a mesh mTLS connection; they are pooled
        apart from clear-text ones and by the identity they verified, and a rotation (a new
        context) leaves the kept-alive ones in use."""
        key = (host, port) if tls is None else (host, port, tls[1])
        t = timeouts or {}
        conn = None
        stack = self._idle.get(key)
        while stack:
            try:
                c = stack.pop()
            except IndexError:  # another thread took the last one
                break
            if c.usable():
                conn = c
                break
            c.close()
        if conn is None:
            conn = await connect(key, t.get("connect"), tls)
            self.opened += 1
        try:
            if on_connection is not None:
                on_connection(conn)
            return await self._exchange(conn, method, target, headers, stream, t)
        except BaseException:
            conn.close()
            raise

    async def _exchange(
        self, conn: AsyncConnection, method: str, target: bytes,
        headers: list[tuple[bytes, bytes]], stream: Any, t: dict[str, float | None],
    ) -> httpx.Response:
        first, more, chunked, client_close = request_bytes(method, target, headers, stream)
        write_timeout = t.get("write")
        await conn.send(first, write_timeout)
        if more:
            async for part in stream:
                if part:
                    await conn.send(encode_chunk(part) if chunked else part, write_timeout)
            if chunked:
                await conn.send(LAST_CHUNK, write_timeout)
        read_timeout = t.get("read")
        while True:
            head = take_head(conn.buf, conn.eof)
            if head is None:
                await conn.fill(read_timeout)
                continue
            status, version, resp_headers = parse_head(head)
            if 100 <= status < 200 and status != 101:
                continue
            break
        reader, server_close = framing(method, status, version, resp_headers)
        if server_close or client_close:
            conn.reusable = False
        return httpx.Response(
            status_code=status, headers=resp_headers,
            stream=AsyncBody(conn, self, reader, read_timeout),
            extensions={"http_version": version},
        )

    def idle_count(self) -> int:
        return sum(len(s) for s in self._idle.values())

    async def aclose(self) -> None:
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for conn in stack:
                conn.close()
