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
is allowed by RFC 9112 9.3.2 and answered in order). Bodies stream (``request.Body``, with
flow control); responses are framed by ``responder.Responder``. The timers of every
connection (head, idle) are checked by a sweep of the server a few times per timeout rather
than by one loop timer per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

from meshlib.shim.metrics import ShimMetrics
from meshlib.shim.request import Body, BodyError, Request
from meshlib.shim.responder import Responder
from meshlib.shim.tls_accept import SniffingListener, peer_extension
from meshlib.tls import ServerTLS

__all__ = ["Body", "BodyError", "FrontServer", "Limits", "Request", "Responder",
           "ServerConnection"]

log = logging.getLogger("meshlib.shim")


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


Handler = Callable[[Request, Responder], Awaitable[None]]


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
        #: the ASGI TLS extension (verified peer) of a mesh mTLS connection, else None
        self.peer_tls: dict[str, Any] | None = None

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.server.tls is not None:
            self.peer_tls = peer_extension(transport, self.server.tls)
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
        elif self.busy and self.task is not None:
            # the app went away: stop working for it (the forward is cancelled, its upstream
            # connection aborted, its load and breaker slots released by the call plan)
            self.task.cancel()

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel.client_eof()
            return True  # keep our side open until the upstream finishes (half-close)
        cur = self.cur
        if cur is not None and cur.body is not None and not cur.body.done:
            cur.body._end("client closed the connection before the request body ended")
        # The app closed its side while a request is pending: like nginx (without
        # proxy_ignore_client_abort), take it as the app giving up. Closing the transport
        # (return False) leads to connection_lost, which cancels the forward.
        return False

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
        if not self.in_head:  # a pipelined request starting inside an earlier chunk
            self.in_head = True
            self.head_bytes = 0
            self._arm(self.limits.head_timeout, self._head_expired)
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
        elif lname == b"x-mesh-timeout":
            cur.timeout = value
        elif lname == b"expect":
            cur.expect = value
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
        if cur.chunked or (cur.content_length is not None and cur.content_length > 0):
            expect = cur.expect
            cur.body = Body(self, expect is not None and expect.lower() == b"100-continue"
                            and cur.version == "1.1")
        # else: no body (Request.body stays None)
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
                if not self.queue:
                    if self.cur is None:
                        self._arm(self.limits.idle_timeout, self._idle_expired)
                    elif self.in_head:  # the next head is arriving: it gets its own time
                        self._arm(self.limits.head_timeout, self._head_expired)
        finally:
            self.task = None
            if self.stopped and not self.queue and not self.busy and self.tunnel is None:
                self.close()

    def close(self) -> None:
        self.stopped = True
        self._disarm()
        if self.transport is not None and not self.closed:
            self.transport.close()


class FrontServer:
    """A listening socket whose connections feed ``handler(request, responder)``."""

    def __init__(self, handler: Handler, limits: Limits,
                 loop: asyncio.AbstractEventLoop | None = None, name: str = "outbound",
                 tls: ServerTLS | None = None) -> None:
        self.handler = handler
        #: mesh mTLS (the inbound port with ``--identity on``): TLS and clear-text callers on
        #: one port, told apart by their first byte (``tls_accept.SniffingListener``)
        self.tls = tls
        self.listener: SniffingListener | None = None
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
        if self.tls is not None:
            self.listener = SniffingListener(self.loop, lambda: ServerConnection(self),
                                             self.tls, self.limits.head_timeout)
            self.port = await self.listener.listen(host, port)
        else:
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
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            conn.close()
