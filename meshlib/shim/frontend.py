"""The shim's HTTP/1.1 server side: llhttp (``httptools``) with strict settings, on asyncio.

Parsing is llhttp's, with its lenient modes off (``set_dangerous_leniencies`` is never
called), which rejects what RFC 9112 says a server must reject: Content-Length together with
Transfer-Encoding, invalid or repeated Content-Length, a Transfer-Encoding whose last coding
is not ``chunked``, obs-fold, whitespace before the colon, NUL, bare CR or LF, and data after
``Connection: close``. llhttp does not check the rest, so this module does (each rejected
with 400 and the connection closed, nothing handed to the application):

* a missing or repeated ``Host`` (RFC 9112 3.2; HTTP/1.0 may omit it) and Transfer-Encoding
  in an HTTP/1.0 request (RFC 9112 6.1: must be treated as faulty framing);
* versions other than 1.0 and 1.1 (HTTP/0.9 has no headers to route by);
* limits (each a flag, see ``config.py``): a head (request line and fields) over
  ``max_head_bytes`` or more than ``max_header_fields`` fields -> 431; a body over
  ``max_body_bytes`` -> 413 (at once from Content-Length, or when a chunked body crosses
  it); a client that takes longer than ``head_timeout`` to send a head (slowloris) -> 408
  and close; a request body that stalls for ``client_idle_timeout`` -> 408 (or the
  forward is abandoned); idle keep-alive connections are closed after
  ``client_idle_timeout``.

Requests are queued per connection and handled one at a time in arrival order (pipelining
is allowed by RFC 9112 9.3.2 and answered in order). Bodies stream: ``Request.body`` is an
async iterator fed by the parser with flow control (reading pauses while more than 256 KiB
wait), so no body is held whole unless the handler asks for it (``read_upto``).

Responses (:class:`Responder`) are framed here from what the handler knows: no body for HEAD
requests and for 1xx, 204 and 304 (tracked from the request method and the status, never
guessed by a response parser), ``Content-Length`` when the length is known, chunked for an
HTTP/1.1 client otherwise, and close-delimited for an HTTP/1.0 client. ``Connection: close``
is sent, and the connection closed after the response, when the client asked for it, when
the request body was not read to its end, or when the server is draining.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

import httptools

from meshlib.shim.metrics import ShimMetrics

log = logging.getLogger("meshlib.shim")

_BODY_HIGH: Final = 256 * 1024
_STATUS_LINES: Final = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode()) for s in HTTPStatus
}
_NO_BODY_STATUS: Final = frozenset({204, 304})


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Status\r\n" % status


class Limits:
    """The front end's limits (from ``ShimConfig``)."""

    __slots__ = ("max_head", "max_fields", "max_body", "head_timeout", "idle_timeout")

    def __init__(self, max_head: int = 60 * 1024, max_fields: int = 100, max_body: int = 0,
                 head_timeout: float = 10.0, idle_timeout: float = 60.0) -> None:
        self.max_head = max_head
        self.max_fields = max_fields
        self.max_body = max_body
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout


class BodyError(Exception):
    """The request body could not be read to its end (client gone, bad framing, too big)."""


class Body:
    """A request body as the parser delivers it; iterate it once (``async for``)."""

    __slots__ = ("conn", "parts", "size", "done", "error", "waiter", "expect_continue",
                 "consumed", "received", "error_status")

    def __init__(self, conn: ServerConnection, expect_continue: bool) -> None:
        self.conn = conn
        self.parts: deque[bytes] = deque()
        self.size = 0  # bytes buffered
        self.received = 0  # bytes received in total
        self.done = False
        self.error: str | None = None
        self.error_status = 400  # the answer to give when ``error`` is set
        self.waiter: asyncio.Future[None] | None = None
        self.expect_continue = expect_continue
        self.consumed = False

    def _feed(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)
        self.received += len(data)
        if self.size > _BODY_HIGH:
            self.conn._pause()
        self._wake()

    def _end(self, error: str | None = None) -> None:
        self.done = True
        if error is not None and self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _next(self) -> bytes | None:
        while True:
            if self.parts:
                part = self.parts.popleft()
                self.size -= len(part)
                if self.size <= _BODY_HIGH // 2:
                    self.conn._resume()
                return part
            if self.error is not None:
                raise BodyError(self.error)
            if self.done:
                self.consumed = True
                return None
            if self.expect_continue:
                self.expect_continue = False
                self.conn._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            conn = self.conn
            conn._resume()
            w = self.waiter = conn.loop.create_future()
            stall = conn.limits.idle_timeout
            if not stall:
                await w
                continue
            handle = conn.loop.call_later(stall, _stalled, w)
            try:
                await w
            finally:
                handle.cancel()
            if w.result() is _STALLED:
                self.error_status = 408
                self.error = f"no request body bytes for {stall}s"
                raise BodyError(self.error)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            part = await self._next()
            if part is None:
                return
            yield part

    async def read_upto(self, limit: int) -> tuple[list[bytes], bool]:
        """Read parts until the body ends (True) or more than ``limit`` bytes were read
        (False: the rest is still to come through iteration)."""
        got: list[bytes] = []
        n = 0
        while n <= limit:
            part = await self._next()
            if part is None:
                return got, True
            got.append(part)
            n += len(part)
        return got, False


_STALLED: Final = object()


def _stalled(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_STALLED)


class Request:
    """One parsed request head and its streaming body."""

    __slots__ = ("method", "target", "version", "headers", "body", "keep_alive",
                 "content_length", "chunked", "reject", "host", "upgrade", "tail", "queued")

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: Body | None = None
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.reject: tuple[int, str] | None = None
        self.host: bytes | None = None
        self.upgrade = False  # an Upgrade/CONNECT request: llhttp hands over the raw stream
        self.tail = b""  # bytes after an upgrade request's head
        self.queued = False

    def header(self, lname: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None


Handler = Callable[[Request, "Responder"], Awaitable[None]]


class _Reject(Exception):
    pass


class ServerConnection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.cur: Request | None = None  # being parsed
        self.head_size = 0
        self.fields = 0
        self.in_head = False
        self.head_bytes = 0
        self.stopped = False  # no more parsing (rejected, closing, upgraded)
        self.expires = 0.0  # loop time when ``on_expire`` runs (0: no timer); FrontServer sweeps
        self.on_expire: Callable[[], None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.closed = False
        self.busy = False  # a request is being handled
        self.tunnel: Any = None  # set by an upgrade handler: receives raw bytes
        self.upgrade_req: Request | None = None

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.server.gauge.inc()
        self._arm(self.limits.idle_timeout, self._idle_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.gauge.dec()
        self._disarm()
        cur = self.cur
        if cur is not None and cur.body is not None and not cur.body.done:
            cur.body._end("client closed the connection before the request body ended")
        for req in self.queue:
            if req.body is not None and not req.body.done:
                req.body._end("client closed the connection")
        self._wake()
        d = self.drained
        if d is not None and not d.done():
            d.set_result(None)
        if self.tunnel is not None:
            self.tunnel.client_lost()

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel.client_eof()
            return True  # keep our side open until the upstream finishes (half-close)
        cur = self.cur
        if cur is not None and cur.body is not None and not cur.body.done:
            cur.body._end("client closed the connection before the request body ended")
        # keep the transport open to answer what was asked (then close), else close at once
        return bool(self.busy or self.queue)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        d = self.drained
        if d is not None and not d.done():
            d.set_result(None)
        if self.tunnel is not None:
            self.tunnel.client_drained()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.stopped:
            return
        if not self.in_head and self.cur is None:
            self.in_head = True
            self.head_bytes = 0
            self._arm(self.limits.head_timeout, self._head_expired)
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # CONNECT or Upgrade: llhttp stops parsing after the head (on_message_complete
            # has run); the rest of ``data`` belongs to the tunnel, if one is made
            req, self.upgrade_req = self.upgrade_req, None
            self.cur = None
            self.stopped = True
            self._pause()
            if req is not None:
                req.upgrade = True
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                req.tail = data[offset:]
                self._enqueue(req)
            return
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        if self.in_head and self.head_bytes > self.limits.max_head:
            self._fail_head(431, f"request head larger than {self.limits.max_head} bytes")

    # ---------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        self.cur = Request()
        self.head_size = 0
        self.fields = 0

    def on_url(self, url: bytes) -> None:
        cur = self.cur
        assert cur is not None
        cur.target += url
        self.head_size += len(url)
        if self.head_size > self.limits.max_head:
            self._reject(431, f"request head larger than {self.limits.max_head} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        cur = self.cur
        assert cur is not None
        self.fields += 1
        self.head_size += len(name) + len(value) + 4
        if self.fields > self.limits.max_fields:
            self._reject(431, f"more than {self.limits.max_fields} header fields")
        if self.head_size > self.limits.max_head:
            self._reject(431, f"request head larger than {self.limits.max_head} bytes")
        lname = name.lower()
        if lname == b"host":
            if cur.host is not None:
                self._reject(400, "repeated Host header field (RFC 9112 3.2)")
            cur.host = value
        elif lname == b"transfer-encoding":
            cur.chunked = True  # llhttp has checked that the last coding is chunked
        elif lname == b"content-length":
            cur.content_length = int(value)  # llhttp has checked 1*DIGIT, no duplicates
        cur.headers.append((name, value))

    def on_headers_complete(self) -> None:
        cur = self.cur
        assert cur is not None
        self.in_head = False
        self._disarm()
        p = self.parser
        cur.method = p.get_method().decode("ascii", "replace")
        cur.version = p.get_http_version()
        cur.keep_alive = p.should_keep_alive()
        if cur.version not in ("1.1", "1.0"):
            self._reject(400 if cur.version.startswith("0") else 505,
                         f"HTTP/{cur.version} is not supported (HTTP/1.0 and 1.1 only)")
        if cur.host is None and cur.version == "1.1":
            self._reject(400, "missing Host header field (RFC 9112 3.2)")
        if cur.chunked and cur.version == "1.0":
            self._reject(400, "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
        mb = self.limits.max_body
        if mb and cur.content_length is not None and cur.content_length > mb:
            self._reject(413, f"request body of {cur.content_length} bytes is over the "
                         f"limit of {mb} bytes")
        expect = cur.header(b"expect")
        cur.body = Body(self, expect is not None and expect.lower() == b"100-continue"
                        and cur.version == "1.1")
        if cur.content_length == 0 or (cur.content_length is None and not cur.chunked):
            cur.body.done = True
            cur.body.consumed = True
            cur.body.expect_continue = False
        if p.should_upgrade():
            self.upgrade_req = cur
            return  # llhttp raises HttpParserUpgrade after this callback
        self._enqueue(cur)

    def on_body(self, body: bytes) -> None:
        cur = self.cur
        assert cur is not None and cur.body is not None
        mb = self.limits.max_body
        if mb and cur.body.received + len(body) > mb:
            self._reject(413, f"request body over the limit of {mb} bytes")
        cur.body._feed(body)

    def on_message_complete(self) -> None:
        cur = self.cur
        if cur is None:
            return
        if cur.body is not None:
            cur.body._end()
        self.cur = None
        if not cur.keep_alive:
            self.stopped = True  # nothing after this request is read

    # ---------------------------------------------------------------- rejections
    def _reject(self, status: int, message: str) -> None:
        cur = self.cur
        if cur is not None and cur.reject is None:
            cur.reject = (status, message)
        raise _Reject(message)

    def _parse_failed(self, exc: Exception) -> None:
        """A framing or syntax error (llhttp's or ours): answer it, close, forward nothing."""
        self.stopped = True
        self._disarm()
        cur = self.cur
        self.cur = None
        if cur is None:
            cur = Request()
        status, message = cur.reject or (400, f"malformed request: {exc}")
        if isinstance(exc, httptools.HttpParserCallbackError) and exc.__cause__ is not None \
                and not isinstance(exc.__cause__, _Reject) and cur.reject is None:
            log.exception("shim front end callback failed", exc_info=exc.__cause__)
            status, message = 500, "internal error"
        if cur.queued:
            # the request is already being forwarded: the handler sees the body error
            if cur.body is not None:
                cur.body.error_status = status
                cur.body._end(message)
            return
        cur.reject = (status, message)
        cur.keep_alive = False
        self._enqueue(cur)

    def _fail_head(self, status: int, message: str) -> None:
        self.stopped = True
        self._disarm()
        cur = self.cur or Request()
        self.cur = None
        cur.reject = (status, message)
        cur.keep_alive = False
        self._enqueue(cur)

    def _head_expired(self) -> None:
        if self.busy or self.queue:
            return
        self._fail_head(408, f"request head not received within {self.limits.head_timeout}s")

    def _idle_expired(self) -> None:
        if not self.busy and not self.queue and self.cur is None and self.transport:
            self.transport.close()

    # ---------------------------------------------------------------- helpers
    def _arm(self, seconds: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``seconds`` unless re-armed or disarmed first. No loop timer per
        request: ``FrontServer`` sweeps its connections a few times per timeout."""
        if seconds and seconds > 0:
            self.expires = self.loop.time() + seconds
            self.on_expire = fn
        else:
            self.expires = 0.0

    def _disarm(self) -> None:
        self.expires = 0.0

    def _pause(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            if self.stopped and self.tunnel is None:
                return
            self.reading_paused = False
            self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            d = self.drained = self.loop.create_future()
            await d

    def _enqueue(self, req: Request) -> None:
        req.queued = True
        self.queue.append(req)
        if self.task is None:
            self.task = self.loop.create_task(self._serve())
        else:
            self._wake()

    def _wake(self) -> None:
        w = self.wake
        if w is not None and not w.done():
            w.set_result(None)

    async def _serve(self) -> None:
        """Handle queued requests one at a time, in order."""
        handler = self.server.handler
        try:
            while not self.closed:
                if not self.queue:
                    if self.stopped:
                        break
                    self.wake = self.loop.create_future()
                    await self.wake
                    continue
                req = self.queue.popleft()
                self.busy = True
                responder = Responder(self, req)
                try:
                    if req.reject is not None:
                        status, message = req.reject
                        ShimMetrics.get().rejected(status)
                        responder.close_after = True
                        await responder.simple(status, message)
                    else:
                        await handler(req, responder)
                        if not responder.started:
                            await responder.simple(502, "no response")
                except Exception:
                    log.exception("shim: handling %s %r failed", req.method, req.target[:200])
                    if not responder.started:
                        responder.close_after = True
                        await responder.simple(500, "internal error in the shim")
                    else:
                        responder.close_after = True
                finally:
                    self.busy = False
                if responder.close_after or responder.tunnelled:
                    if not responder.tunnelled:
                        self.close()
                    return
                body = req.body
                if body is not None and not body.done:
                    # the handler did not read the body: the connection cannot be reused
                    self.close()
                    return
                if not self.queue and self.cur is None:
                    self._arm(self.limits.idle_timeout, self._idle_expired)
        finally:
            self.task = None
            if self.stopped and not self.queue and not self.busy and self.tunnel is None:
                self.close()

    def close(self) -> None:
        self.stopped = True
        self._disarm()
        if self.transport is not None and not self.closed:
            self.transport.close()


class Responder:
    """Writes one response to the client, framing it (see the module docstring)."""

    __slots__ = ("conn", "req", "started", "chunked", "close_after", "no_body", "tunnelled",
                 "status", "pending")

    def __init__(self, conn: ServerConnection, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.started = False
        self.chunked = False
        self.no_body = False
        self.tunnelled = False
        self.status = 0
        self.pending: bytes | None = None  # the head, not written yet
        srv = conn.server
        self.close_after = (not req.keep_alive) or srv.draining or req.upgrade

    def start(self, status: int, headers: list[tuple[bytes, bytes]],
              length: int | None, hold: bool = True) -> None:
        """Send the head. ``headers`` must not contain framing or hop-by-hop fields except
        ``Content-Length`` when ``length`` is given (HEAD/304 keep the upstream's value).
        ``hold``: keep the head until the first body bytes or :meth:`end` (one write for a
        small response); pass False when the body may be slow to come (the client must see
        the head at once)."""
        req = self.req
        self.started = True
        self.status = status
        self.no_body = (req.method == "HEAD" or status in _NO_BODY_STATUS
                        or 100 <= status < 200)
        conn = self.conn
        if conn.server.draining or (conn.stopped and not conn.queue) or (
                req.body is not None and req.body.error is not None):
            self.close_after = True  # nothing more will be read from this connection
        parts = [status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.no_body:
            if length is not None:
                parts.append(b"Content-Length: %d\r\n" % length)
            elif req.version == "1.1":
                self.chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.close_after = True  # close-delimited for an HTTP/1.0 client
        elif length is not None and status not in _NO_BODY_STATUS:
            parts.append(b"Content-Length: %d\r\n" % length)
        body = req.body
        if body is not None and not body.done and not req.upgrade:
            self.close_after = True  # the rest of the request body will not be read
        if self.close_after:
            parts.append(b"Connection: close\r\n")
        elif req.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        if hold:
            self.pending = head
        else:
            self.conn._write(head)

    async def write(self, data: bytes) -> None:
        if self.no_body or not data:
            return
        conn = self.conn
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        pending = self.pending
        if pending is not None:
            self.pending = None
            if len(data) < 65536:
                data = pending + data
            else:
                conn._write(pending)
        conn._write(data)
        if conn.write_paused:
            await conn.drain()
        if conn.closed:
            raise ConnectionResetError("client closed the connection")

    def end(self) -> None:
        tail = b"0\r\n\r\n" if self.chunked and not self.no_body else b""
        pending = self.pending
        if pending is not None:
            self.pending = None
            tail = pending + tail
        if tail:
            self.conn._write(tail)

    def switch(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the endpoint's ``101 Switching Protocols`` (with its ``Upgrade`` and
        ``Connection: upgrade``); the connection then belongs to a tunnel."""
        self.started = True
        self.tunnelled = True
        self.status = 101
        self.no_body = True
        parts = [status_line(101)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.conn._write(b"".join(parts))

    def abort(self) -> None:
        """The response cannot be completed (upstream failed mid-body): close the connection
        without the final chunk, so the client sees an incomplete message, not a short one."""
        self.close_after = True
        self.pending = None
        t = self.conn.transport
        if t is not None:
            t.abort()

    async def simple(self, status: int, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """A small text/plain answer from the shim itself."""
        body = (message + "\n").encode()
        hdrs = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"X-Mesh-Shim", b"1")]
        if headers:
            hdrs += headers
        if status >= 400:
            # a request body that was not read would be parsed as the next request
            body_obj = self.req.body
            if body_obj is not None and not body_obj.done:
                self.close_after = True
        self.start(status, hdrs, len(body))
        await self.write(body)
        self.end()


class FrontServer:
    """A listening socket whose connections feed ``handler(request, responder)``."""

    def __init__(self, handler: Handler, limits: Limits,
                 loop: asyncio.AbstractEventLoop | None = None, name: str = "outbound") -> None:
        self.handler = handler
        self.gauge = ShimMetrics.get().connections.labels(name)
        self.limits = limits
        self.loop = loop or asyncio.get_event_loop()
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self.sweeper: asyncio.TimerHandle | None = None
        self.sweep_interval = 1.0

    async def listen(self, host: str, port: int) -> int:
        self.server = await self.loop.create_server(
            lambda: ServerConnection(self), host, port, reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        lim = self.limits
        timeouts = [t for t in (lim.head_timeout, lim.idle_timeout) if t and t > 0]
        if timeouts:  # the timers of every connection, checked ~5 times per shortest timeout
            self.sweep_interval = min(1.0, max(0.02, min(timeouts) / 5))
            self.sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        return self.port

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            expires = conn.expires
            if expires and now >= expires and conn.on_expire is not None:
                conn.expires = 0.0
                try:
                    conn.on_expire()
                except Exception:
                    log.exception("shim: connection timer failed")
        self.sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    def start_drain(self) -> None:
        """Answer with ``Connection: close`` from now on; close idle connections now."""
        self.draining = True
        for conn in list(self.connections):
            if not conn.busy and not conn.queue and conn.cur is None and conn.tunnel is None:
                conn.close()

    def busy(self) -> int:
        return sum(1 for c in self.connections if c.busy or c.queue or c.tunnel is not None)

    async def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()
