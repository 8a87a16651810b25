"""Byte tunnels after ``101 Switching Protocols`` (WebSocket and other HTTP/1.1 upgrades).

An ``Upgrade`` request to a mesh service goes through the call plan like any other (endpoint
pick, breaker admission, metrics; never resent once written: its body is not replayable);
when the endpoint answers 101, the shim relays the 101 to the app and from then on copies
bytes both ways between the app's connection and that upstream connection, without parsing
them (RFC 9110 7.8: after the 101 the connection speaks the new protocol).

Flow control both ways, as ``asyncio.StreamWriter.drain`` would do it with callbacks: when one
side's write buffer passes its high-water mark (``pause_writing``), reading from the other side
pauses until it drains (``resume_writing``). Half-close is passed on (``write_eof`` when one
side sends FIN); the tunnel ends when both directions ended or either connection is lost, and
then both are closed. The upstream connection is never returned to the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshlib.shim.metrics import ShimMetrics

if TYPE_CHECKING:
    from meshlib.shim.frontend import ServerConnection
    from meshlib.shim.upstream import _Conn


class Tunnel:
    __slots__ = ("client", "up", "client_done", "up_done", "closed")

    def __init__(self, client: ServerConnection, up: _Conn) -> None:
        self.client = client
        self.up = up
        self.client_done = False  # the app sent FIN
        self.up_done = False  # the endpoint sent FIN
        self.closed = False
        up.reusable = False
        up.tunnel = self
        client.tunnel = self
        ShimMetrics.get().tunnels.inc()

    def start(self, tail: bytes) -> None:
        """Hand over: bytes the endpoint sent after its 101 head, then the app's bytes that
        followed its request head (``tail``), then live traffic."""
        up = self.up
        if up.buf:
            data = bytes(up.buf)
            up.buf.clear()
            self.client._write(data)
        if tail:
            self._to_up(tail)
        if up.reading_paused and up.transport is not None:
            up.reading_paused = False
            up.transport.resume_reading()
        if up.eof:
            self.upstream_eof()
        self.client._resume()

    # app -> endpoint
    def from_client(self, data: bytes) -> None:
        self._to_up(data)

    def _to_up(self, data: bytes) -> None:
        t = self.up.transport
        if t is None or t.is_closing():
            self.close()
            return
        t.write(data)
        if self.up.paused:
            self.client._pause()

    def upstream_drained(self) -> None:
        self.client._resume()

    # endpoint -> app
    def from_upstream(self, data: bytes) -> None:
        client = self.client
        if client.closed:
            self.close()
            return
        client._write(data)
        if client.write_paused and self.up.transport is not None:
            self.up.transport.pause_reading()

    def client_drained(self) -> None:
        t = self.up.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    # ends
    def client_eof(self) -> None:
        self.client_done = True
        t = self.up.transport
        if t is not None and t.can_write_eof() and not t.is_closing():
            t.write_eof()
        if self.up_done:
            self.close()

    def upstream_eof(self) -> None:
        self.up_done = True
        t = self.client.transport
        if t is not None and t.can_write_eof() and not t.is_closing():
            t.write_eof()
        if self.client_done:
            self.close()

    def client_lost(self) -> None:
        self.close()

    def upstream_lost(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        ShimMetrics.get().tunnels.dec()
        self.up.close()
        self.client.tunnel = None
        self.client.close()
