"""One request as the shim's front end parsed it: its head and its streaming body.

:class:`Body` is fed by the parser (``frontend.ServerConnection``) and read once by a
handler (``async for``, or :meth:`Body.read_upto` to keep a small body whole). Flow control:
reading from the client pauses while more than 256 KiB wait unread and resumes when half of
it was consumed; an ``Expect: 100-continue`` request gets its ``100 Continue`` when the
handler first asks for body bytes (RFC 9110 10.1.1), never before; a body that stalls for
the client idle timeout ends with :class:`BodyError` (408).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from meshlib.shim.frontend import ServerConnection

_BODY_HIGH: Final = 256 * 1024


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
                 "content_length", "chunked", "reject", "host", "upgrade", "tail", "queued",
                 "timeout", "expect")

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: Body | None = None  # None: the request has no body
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.reject: tuple[int, str] | None = None
        self.host: bytes | None = None
        self.upgrade = False  # an Upgrade/CONNECT request: llhttp hands over the raw stream
        self.tail = b""  # bytes after an upgrade request's head
        self.queued = False
        self.timeout: bytes | None = None  # x-mesh-timeout, noted while parsing
        self.expect: bytes | None = None  # Expect, noted while parsing

    def header(self, lname: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None
