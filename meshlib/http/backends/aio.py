"""asyncio I/O for the async HTTP driver (see ``meshlib.http.backends``).

A connection is an ``asyncio.Protocol`` that buffers received bytes and wakes the one reader
waiting for them: no ``StreamReader``, no anyio cancel scopes. Writing is flow-controlled:
:meth:`AsyncConnection.send` waits (at most the write timeout) whenever the transport's write
buffer is over its high-water mark (``pause_writing``/``resume_writing``, as
``asyncio.StreamWriter.drain`` does), so a slow server does not make it buffer a whole stream
in memory. Reading is flow-controlled the same way: the protocol pauses the transport once
more than ``_READ_HIGH`` bytes are buffered and resumes it when the body reader asks for more,
so a slowly consumed response body stays mostly in the kernel and on the server, as with a
blocking socket. An idle connection is unusable once the protocol saw EOF or bytes.

Hedged attempts (``retries.hedging``) run as tasks on the caller's event loop; a loser's task
is cancelled (the pool closes its connection) and a response that arrived anyway is closed
unread in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from meshlib.core.mtls import MtlsRefused
from meshlib.tls import count_refusal, handshake_refusal, verify_server

Key = tuple[Any, ...]  # (host, port), or (host, port, expected SPIFFE ID) for mesh mTLS
TLSTarget = tuple[ssl.SSLContext, str]  # (client context, expected server SPIFFE ID)
_RECV = 65536  # largest plaintext taken from OpenSSL at once
_READ_HIGH = 1 << 20  # pause reading with this many response bytes buffered

sleep = asyncio.sleep


async def discard(value: Any) -> None:
    """Release a response that will not be returned (its attempt is being retried): read
    it to its end, so that its connection can be reused."""
    if isinstance(value, httpx.Response):
        with contextlib.suppress(httpx.HTTPError):
            await value.aread()
        await value.aclose()


class AsyncConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: buffers received bytes and wakes the one reader waiting.

    Mesh mTLS runs OpenSSL over memory buffers (``ssl.SSLObject`` with two ``ssl.MemoryBIO``,
    CPython docs "Memory BIO Support") inside this protocol, on a plain transport: asyncio's
    own TLS (``loop.create_connection(ssl=...)``, ``asyncio.sslproto``) adds a second
    protocol, its buffers and several Python calls to every read and write."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Key,
                 tls: ssl.SSLContext | None = None) -> None:
        self.loop = loop
        self.key = key
        self.tls: ssl.SSLObject | None = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | None = None
        self.handshaking = False
        if tls is not None:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = tls.wrap_bio(self.incoming, self.outgoing, server_side=False)
            self.handshaking = True
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Any] | None = None
        self.eof = False
        self.reusable = True
        self.paused = False  # the transport's write buffer is over its high-water mark
        self.reading_paused = False  # more than _READ_HIGH bytes buffered
        self.drained: asyncio.Future[Any] | None = None
        self.error: BaseException | None = None  # why the connection was lost (a reset)

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tls is not None:
            self.incoming.write(data)  # type: ignore[union-attr]
            if self.handshaking:
                self._wake()
                return
            data = self._decrypt()
            if not data:
                return
        self.buf += data
        if len(self.buf) > _READ_HIGH and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        # A clean close is EOF; a reset is an error the next read raises, as ``recv`` does
        # in the blocking twin (so both raise ``ReadError`` for it, not "disconnected").
        if exc is None:
            self.eof = True
        else:
            self.error = exc
        self._wake()
        self.resume_writing()

    def _decrypt(self) -> bytes:
        """The application data in the received TLS records (empty when they held none, e.g.
        session tickets); close_notify is EOF, a TLS error ends the connection."""
        tls = self.tls
        assert tls is not None
        out = b""
        while True:
            try:
                chunk = tls.read(_RECV)
            except ssl.SSLWantReadError:
                return out
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLError as exc:
                self.error = exc
                self._wake()
                if self.transport is not None:
                    self.transport.close()
                return out
            if not chunk:
                self.eof = True
                self._wake()
                return out
            out = chunk if not out else out + chunk
            if not self.incoming.pending and not tls.pending():  # type: ignore[union-attr]
                return out  # all decrypted: no second read just to raise "want read"

    async def handshake(self) -> None:
        """Complete the client TLS handshake (the caller bounds it with its timeout)."""
        tls, outgoing, t = self.tls, self.outgoing, self.transport
        assert tls is not None and outgoing is not None and t is not None
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                out = outgoing.read()
                if out:
                    t.write(out)
                if self.eof or self.error is not None:
                    raise ConnectionResetError(
                        "connection closed during the TLS handshake") from self.error
                w = self.waiter = self.loop.create_future()
                await w
        out = outgoing.read()
        if out:
            t.write(out)
        self.handshaking = False
        if self.incoming.pending:  # type: ignore[union-attr]  # records after the handshake
            data = self._decrypt()
            if data:
                self.buf += data

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        d = self.drained
        if d is not None and not d.done():
            d.set_result(None)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ------------------------------------------------------------ the connection interface

    def usable(self) -> bool:
        """Whether an idle connection can carry the next request."""
        t = self.transport
        return (self.reusable and not self.eof and not self.buf and self.error is None
                and t is not None and not t.is_closing())

    def park(self) -> bool:
        """Prepare to sit idle in the pool (False: cannot be kept). An idle connection must
        keep reading, to see the server's FIN (:meth:`usable`)."""
        if not self.usable():
            return False
        if self.reading_paused:
            self.resume()
        return True

    async def send(self, data: bytes, timeout: float | None) -> None:
        """Write ``data``; wait for the transport to drain first if it is over its high-water
        mark (at most ``timeout`` seconds)."""
        if self.tls is not None:
            self.tls.write(data)
            data = self.outgoing.read()  # type: ignore[union-attr]
        self.transport.write(data)  # type: ignore[union-attr]
        if self.paused:
            await self.drain(timeout)

    async def fill(self, timeout: float | None) -> None:
        """Wait for more bytes or EOF, at most ``timeout`` seconds. A connection lost with an
        error (a reset) and no new bytes raises ``ReadError``, as ``recv`` does for the
        blocking twin."""
        if self.reading_paused:
            self.resume()
        if self.error is None:
            have = len(self.buf)
            w = self.waiter = self.loop.create_future()
            if timeout is None:
                await w
            else:
                handle = self.loop.call_later(timeout, _expire, w)
                try:
                    await w
                finally:
                    handle.cancel()
                if w.result() is _TIMED_OUT:
                    raise httpx.ReadTimeout(f"no response data within {timeout}s")
            if self.error is None or len(self.buf) != have:
                return
        raise httpx.ReadError(
            f"read from {self.key[0]}:{self.key[1]} failed: {self.error}") from self.error

    def resume(self) -> None:
        self.reading_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    async def drain(self, timeout: float | None) -> None:
        """Wait until the transport resumes writing, at most ``timeout`` seconds."""
        d = self.drained = self.loop.create_future()
        handle = None if timeout is None else self.loop.call_later(timeout, _expire, d)
        try:
            await d
        finally:
            if handle is not None:
                handle.cancel()
        if d.result() is _TIMED_OUT:
            raise httpx.WriteTimeout("sending the request timed out")
        if self.transport is None or self.transport.is_closing():
            raise httpx.WriteError(f"connection to {self.key[0]}:{self.key[1]} lost while "
                                   "sending the request")

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


_TIMED_OUT = object()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


async def connect(key: Key, timeout: float | None, tls: TLSTarget | None = None
                  ) -> AsyncConnection:
    """Open a connection; with ``tls`` (``(context, expected SPIFFE ID)``) complete a TLS
    handshake and check the server's identity (``meshlib.tls.verify_server``)."""
    loop = asyncio.get_running_loop()
    try:
        if timeout is None:
            proto = await _open(loop, key, tls)
        else:
            proto = await asyncio.wait_for(_open(loop, key, tls), timeout)
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connect to {key[0]}:{key[1]} timed out") from None
    except ssl.SSLError as exc:
        raise httpx.ConnectError(handshake_refusal(exc, f"{key[0]}:{key[1]}")) from exc
    except _HandshakeLost as exc:
        raise httpx.ConnectError(handshake_refusal(exc, f"{key[0]}:{key[1]}")) from exc
    except OSError as exc:
        raise httpx.ConnectError(f"connect to {key[0]}:{key[1]} failed: {exc}") from exc
    if tls is not None:
        _check(proto.tls, proto.transport, tls[1], key)  # type: ignore[arg-type]
    return proto


class _HandshakeLost(Exception):
    """The server closed the connection during the TLS handshake."""


async def _open(loop: asyncio.AbstractEventLoop, key: Key, tls: TLSTarget | None
                ) -> AsyncConnection:
    """TCP connect, then (``tls``) the TLS handshake; the connection is closed on failure."""
    ctx = None if tls is None else tls[0]
    t, proto = await loop.create_connection(lambda: AsyncConnection(loop, key, ctx),
                                            key[0], key[1])
    if tls is not None:
        try:
            await proto.handshake()
        except ConnectionResetError as exc:
            t.close()
            raise _HandshakeLost(str(exc)) from exc
        except BaseException:
            t.close()
            raise
    return proto


def check_server(transport: asyncio.BaseTransport, expected: str, key: Key) -> None:
    """After a client handshake on ``transport``: the server must present ``expected``
    (``meshlib.tls.verify_server``), else the transport is closed and the refusal counted
    and raised as ``httpx.ConnectError``. Also used by the shim's upstream connections."""
    _check(transport.get_extra_info("ssl_object"), transport, expected, key)


def _check(ssl_object: Any, transport: asyncio.BaseTransport, expected: str, key: Key) -> None:
    try:
        verify_server(ssl_object, expected)
    except MtlsRefused as exc:
        transport.close()
        count_refusal("client", exc.reason)
        raise httpx.ConnectError(f"mesh mTLS to {key[0]}:{key[1]}: {exc}") from exc


# --------------------------------------------------------------------------- hedging


class AsyncHedges:
    """Runs the attempts of hedged calls as tasks on the running event loop.

    ``threads`` is the sync twin's thread count (``SyncHedges``); tasks need no bound."""

    def __init__(self, threads: int = 64) -> None:
        self.threads = threads

    def start(self, fn: Callable[..., Any], *args: Any) -> asyncio.Task[Any]:
        """Run ``fn(*args)`` as a task; it returns ``(AttemptResult, seconds)``. Cancelling
        the task closes its connection (the pool closes it on any exception)."""
        return asyncio.get_running_loop().create_task(fn(*args))

    async def wait_first(self, runs: Sequence[asyncio.Task[Any]],
                         timeout: float | None) -> asyncio.Task[Any] | None:
        """The first of ``runs`` to finish within ``timeout`` seconds, or None."""
        done, _ = await asyncio.wait(runs, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return None
        return next(r for r in runs if r in done)

    def cancel(self, run: asyncio.Task[Any]) -> None:
        """Abandon a running attempt; a response that arrived anyway is closed unread."""
        run.cancel()
        run.add_done_callback(_close_result)

    def drop(self, value: Any) -> None:
        """Release a delivered response that will not be returned (the call failed)."""
        if isinstance(value, httpx.Response):
            _close_later(value)

    def close(self) -> None:
        pass


_closing: set[asyncio.Task[Any]] = set()  # strong references to background closes


def _close_later(response: httpx.Response) -> None:
    task = asyncio.get_running_loop().create_task(response.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _close_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        value = task.result()[0].value
        if isinstance(value, httpx.Response):
            _close_later(value)
