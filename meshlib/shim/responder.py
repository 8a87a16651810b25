"""Writing one response to the app: framing chosen from the request and the status.

No body for HEAD requests and for 1xx, 204 and 304 (tracked from the request method and the
status, never guessed by a response parser: MagicStack/httptools#47); ``Content-Length``
when the length is known; chunked for an HTTP/1.1 client otherwise; close-delimited for an
HTTP/1.0 client. ``Connection: close`` is sent, and the connection closed afterwards, when
the client asked for it, when the request body was not read to its end, when nothing more
will be read from the connection, or when the server is draining. A small response is
written with one ``write`` (the head waits for the first body bytes).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from meshlib.shim.frontend import ServerConnection
    from meshlib.shim.request import Request

_STATUS_LINES: Final = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode()) for s in HTTPStatus
}
_NO_BODY_STATUS: Final = frozenset({204, 304})


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Status\r\n" % status


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
