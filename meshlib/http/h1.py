"""A lean asyncio HTTP/1.1 client connection and per-endpoint pool for the async transport.

Why not httpcore here: its ``AsyncConnectionPool`` collapses under concurrency
(encode/httpx#3215), and even a bare ``httpcore.AsyncHTTPConnection`` spends most of a
request in anyio cancel scopes and h11's generic event machinery (profiled here: about
two thirds of the client's CPU per request). A client that only ever speaks HTTP/1.1 over
plain TCP to mesh endpoints needs much less: one ``asyncio.Protocol`` per connection, a
byte buffer, and the message framing rules of RFC 9112 section 6:

* a response to HEAD, and 1xx / 204 / 304 responses, have no body;
* ``Transfer-Encoding: chunked`` (last coding) -> chunked body (chunk extensions and
  trailers are read and ignored);
* else ``Content-Length`` -> exactly that many bytes (several differing values, or an
  invalid one, are a protocol error: RFC 9112 6.3 item 5);
* else the body runs until the server closes the connection (and the connection is not
  reused).

A connection is reused only when the response was read to its end, neither side said
``Connection: close`` and the response is HTTP/1.1. Idle connections live in a LIFO stack
per endpoint (the most recently used is the warmest and the least likely to have been
closed by the server). Errors are raised as the httpx exceptions httpx's own transport
would raise, so the retry classification (``attempt.error_kind``) is the same for both
transports. Timeouts follow httpx's per-phase model: ``connect``, ``write`` and ``read``
(each read of the response may wait at most ``read`` seconds).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

_CRLF = b"\r\n"
_HEADER_END = b"\r\n\r\n"
_MAX_HEAD = 64 * 1024
_READ_CHUNK_BUDGET = 1 << 20


class _Protocol(asyncio.Protocol):
    """Buffers received bytes and wakes the one reader waiting for them."""

    __slots__ = ("transport", "buf", "waiter", "eof", "exc", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.eof = False
        self.exc: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.eof = True
        self.exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Wait for more bytes or EOF, at most ``timeout`` seconds (httpx.ReadTimeout)."""
        w = self.waiter = self.loop.create_future()
        if timeout is None:
            await w
            return
        handle = self.loop.call_later(timeout, _expire, w)
        try:
            await w
        finally:
            handle.cancel()
        if w.result() is _TIMED_OUT:
            raise httpx.ReadTimeout(f"no response data within {timeout:.3f}s")


_TIMED_OUT = object()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


class H1Connection:
    """One HTTP/1.1 connection to one endpoint; one request at a time."""

    __slots__ = ("proto", "key", "reusable", "busy")

    def __init__(self, proto: _Protocol, key: tuple[str, int]) -> None:
        self.proto = proto
        self.key = key
        self.reusable = True
        self.busy = False

    @property
    def usable(self) -> bool:
        p = self.proto
        return self.reusable and not p.eof and not p.buf and p.transport is not None \
            and not p.transport.is_closing()

    def close(self) -> None:
        self.reusable = False
        t = self.proto.transport
        if t is not None:
            t.close()


async def _send_body(conn: H1Connection, stream: Any, chunked: bool) -> None:
    t = conn.proto.transport
    assert t is not None
    async for part in stream:
        if not part:
            continue
        if chunked:
            t.write(b"%x\r\n%s\r\n" % (len(part), part))
        else:
            t.write(part)
    if chunked:
        t.write(b"0\r\n\r\n")


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(_CRLF)
    status_line = lines[0]
    try:
        version, code, *_ = status_line.split(b" ", 2)
        status = int(code)
    except ValueError:
        raise httpx.RemoteProtocolError(f"malformed status line {status_line[:80]!r}") from None
    if not version.startswith(b"HTTP/1.") or not 100 <= status <= 999:
        raise httpx.RemoteProtocolError(f"malformed status line {status_line[:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return status, version, headers


class _Body(httpx.AsyncByteStream):
    """The response body as an async byte stream; ``aclose`` recycles or closes the connection."""

    __slots__ = ("conn", "pool", "mode", "remaining", "timeout", "done", "closed")

    def __init__(self, conn: H1Connection, pool: H1Pool, mode: str, length: int,
                 timeout: float | None) -> None:
        self.conn = conn
        self.pool = pool
        self.mode = mode  # "none", "length", "chunked", "close"
        self.remaining = length
        self.timeout = timeout
        self.done = mode == "none" or (mode == "length" and length == 0)
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        p = self.conn.proto
        if self.mode == "length":
            while self.remaining > 0:
                if not p.buf:
                    if p.eof:
                        raise httpx.RemoteProtocolError(
                            f"server closed the connection with {self.remaining} body bytes "
                            "still to come"
                        )
                    await p.wait(self.timeout)
                    continue
                n = min(len(p.buf), self.remaining)
                chunk = bytes(p.buf[:n])
                del p.buf[:n]
                self.remaining -= n
                yield chunk
            self.done = True
        elif self.mode == "chunked":
            async for chunk in self._chunks(p):
                yield chunk
            self.done = True
        elif self.mode == "close":
            while True:
                if p.buf:
                    chunk = bytes(p.buf)
                    p.buf.clear()
                    yield chunk
                    continue
                if p.eof:
                    break
                await p.wait(self.timeout)
            self.done = True

    async def _line(self, p: _Protocol) -> bytes:
        while True:
            i = p.buf.find(_CRLF)
            if i >= 0:
                line = bytes(p.buf[:i])
                del p.buf[: i + 2]
                return line
            if p.eof:
                raise httpx.RemoteProtocolError("server closed the connection inside a chunk")
            if len(p.buf) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("chunk header line too long")
            await p.wait(self.timeout)

    async def _chunks(self, p: _Protocol) -> AsyncIterator[bytes]:
        while True:
            size_line = await self._line(p)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while await self._line(p):  # trailers, until the empty line
                    pass
                return
            while len(p.buf) < size + 2:
                if p.eof:
                    raise httpx.RemoteProtocolError("server closed the connection inside a chunk")
                await p.wait(self.timeout)
            chunk = bytes(p.buf[:size])
            if p.buf[size:size + 2] != _CRLF:
                raise httpx.RemoteProtocolError("chunk not terminated by CRLF")
            del p.buf[: size + 2]
            yield chunk

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        conn = self.conn
        conn.busy = False
        if self.done and conn.reusable:
            self.pool._give_back(conn)
        else:
            conn.close()


class H1Pool:
    """Per-endpoint stacks of idle :class:`H1Connection` objects."""

    def __init__(self, *, max_idle: int = 64) -> None:
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], deque[H1Connection]] = {}
        self.opened = 0

    def _give_back(self, conn: H1Connection) -> None:
        stack = self._idle.get(conn.key)
        if stack is None:
            stack = self._idle[conn.key] = deque()
        if len(stack) >= self.max_idle or not conn.usable:
            conn.close()
            return
        stack.append(conn)

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> H1Connection:
        loop = asyncio.get_running_loop()
        try:
            coro = loop.create_connection(lambda: _Protocol(loop), key[0], key[1])
            if timeout is None:
                _t, proto = await coro
            else:
                _t, proto = await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"connect to {key[0]}:{key[1]} failed: {exc}") from exc
        self.opened += 1
        return H1Connection(proto, key)

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        stream: Any,
        timeouts: dict[str, float | None] | None,
    ) -> httpx.Response:
        key = (host, port)
        conn: H1Connection | None = None
        stack = self._idle.get(key)
        while stack:
            c = stack.pop()
            if c.usable:
                conn = c
                break
            c.close()
        t = timeouts or {}
        read_timeout = t.get("read")
        if conn is None:
            conn = await self._connect(key, t.get("connect"))
        conn.busy = True
        try:
            return await self._exchange(conn, method, target, headers, stream, read_timeout)
        except BaseException:
            conn.busy = False
            conn.close()
            raise

    async def _exchange(
        self,
        conn: H1Connection,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        stream: Any,
        read_timeout: float | None,
    ) -> httpx.Response:
        p = conn.proto
        transport = p.transport
        assert transport is not None
        chunked = False
        client_close = False
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            lname = name.lower()
            if lname == b"transfer-encoding" and value.lower().endswith(b"chunked"):
                chunked = True
            elif lname == b"connection" and b"close" in value.lower():
                client_close = True
            parts += (name, b": ", value, _CRLF)
        parts.append(_CRLF)
        if isinstance(stream, httpx.ByteStream):
            body = stream._stream  # in-memory body: one write with the head
            if chunked and body:
                parts.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            elif chunked:
                parts.append(b"0\r\n\r\n")
            else:
                parts.append(body)
            transport.write(b"".join(parts))
        else:
            transport.write(b"".join(parts))
            await _send_body(conn, stream, chunked)
        # --- response head (skipping 1xx interim responses) ---
        while True:
            while True:
                i = p.buf.find(_HEADER_END)
                if i >= 0:
                    break
                if p.eof:
                    if p.exc is not None:
                        raise httpx.ReadError(f"connection lost: {p.exc}")
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response."
                    )
                if len(p.buf) > _MAX_HEAD:
                    raise httpx.RemoteProtocolError("response head larger than 64 KiB")
                await p.wait(read_timeout)
            head = bytes(p.buf[:i])
            del p.buf[: i + 4]
            status, version, resp_headers = _parse_head(head)
            if 100 <= status < 200 and status != 101:
                continue
            break
        # --- framing (RFC 9112 6.3) ---
        length = -1
        te_chunked = False
        server_close = version == b"HTTP/1.0"
        for name, value in resp_headers:
            lname = name.lower()
            if lname == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"invalid Content-Length {value!r}") from None
                if n < 0 or (length >= 0 and n != length):
                    raise httpx.RemoteProtocolError(f"invalid Content-Length {value!r}")
                length = n
            elif lname == b"transfer-encoding":
                te_chunked = value.lower().rstrip().endswith(b"chunked")
            elif lname == b"connection":
                v = value.lower()
                if b"close" in v:
                    server_close = True
                elif b"keep-alive" in v and version == b"HTTP/1.0":
                    server_close = False
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            mode, length = "none", 0
        elif te_chunked:
            mode = "chunked"
        elif length >= 0:
            mode = "length"
        else:
            mode, server_close = "close", True
        if server_close or client_close:
            conn.reusable = False
        body = _Body(conn, self, mode, length, read_timeout)
        return httpx.Response(
            status_code=status,
            headers=resp_headers,
            stream=body,
            extensions={"http_version": version},
        )

    def idle_count(self) -> int:
        return sum(len(s) for s in self._idle.values())

    async def aclose(self) -> None:
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for conn in stack:
                conn.close()
