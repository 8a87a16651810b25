"""Blocking I/O for the generated sync HTTP driver (see ``meshlib.http.backends``).

A connection is a blocking socket with ``TCP_NODELAY``. Each wait has its own timeout (httpx's
per-phase model); the socket's timeout is changed only when the next wait wants another one
(a ``settimeout`` is a syscall). An idle connection is checked before reuse with a
non-blocking ``MSG_PEEK``: EOF or unexpected bytes from the server make it unusable.

Hedged attempts (``retries.hedging``) run on a small thread pool, created on the first hedged
call; the calling thread waits for the first one to finish or for the hedge timer. A loser is
cancelled by shutting its socket down (``shutdown(SHUT_RDWR)`` wakes a ``recv`` blocked in the
worker), and a response that arrived anyway is closed unread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from meshlib.core.mtls import MtlsRefused
from meshlib.tls import count_refusal, handshake_refusal, verify_server

Key = tuple[Any, ...]  # (host, port), or (host, port, expected SPIFFE ID) for mesh mTLS
TLSTarget = tuple[ssl.SSLContext, str]  # (client context, expected server SPIFFE ID)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_RECV = 65536

sleep = time.sleep


def discard(value: Any) -> None:
    """Release a response that will not be returned (its attempt is being retried): read
    it to its end, so that its connection can be reused."""
    if isinstance(value, httpx.Response):
        with contextlib.suppress(httpx.HTTPError):
            value.read()
        value.close()


def close_unread(value: Any) -> None:
    """Close a response without reading it (a hedged loser: drop its connection)."""
    if isinstance(value, httpx.Response):
        with contextlib.suppress(httpx.HTTPError):
            value.close()


class SyncConnection:
    """One HTTP/1.1 connection over a blocking socket; mesh mTLS runs OpenSSL over memory
    buffers (``ssl.SSLObject`` with two ``ssl.MemoryBIO``), not an ``ssl.SSLSocket``.

    Why: an ``SSLSocket`` on a socket with a timeout reads like this per response: a
    ``read`` that fails with EAGAIN, a ``poll``, then (OpenSSL without read-ahead) one
    ``read`` for the 5-byte record header and one for the record body, and ``sendall`` is a
    Python loop. With memory BIOs the socket does exactly the clear-text connection's system
    calls (one ``send``, one ``poll`` + ``recv`` of up to 64 KiB that may hold several
    records) and OpenSSL only encrypts and decrypts (CPython docs, "Memory BIO Support")."""

    __slots__ = ("sock", "key", "buf", "eof", "reusable", "timeout", "tls", "incoming",
                 "outgoing", "poller")

    def __init__(self, sock: socket.socket, key: Key, timeout: float | None,
                 tls: Any = None) -> None:
        self.sock = sock
        self.key = key
        self.buf = bytearray()
        self.eof = False
        self.reusable = True
        self.timeout = timeout  # the socket's current timeout
        self.tls: ssl.SSLObject | None = tls[0] if tls is not None else None
        self.incoming: ssl.MemoryBIO | None = tls[1] if tls is not None else None
        self.outgoing: ssl.MemoryBIO | None = tls[2] if tls is not None else None
        self.poller: Any = None  # select.poll of a TLS socket, made on first reuse

    def _settimeout(self, timeout: float | None) -> None:
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout

    def usable(self) -> bool:
        """Whether an idle connection can carry the next request."""
        if not self.reusable or self.eof or self.buf:
            return False
        # A socket with a timeout polls for up to that timeout *before* recv, whatever the
        # flags (CPython sock_call_ex): MSG_DONTWAIT alone stalled every reuse for the whole
        # read timeout. Timeout 0 makes the peek really non-blocking.
        if self.tls is not None:
            return self._tls_usable()
        self._settimeout(0.0)
        try:
            data = self.sock.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        del data  # EOF (b"") or unexpected bytes from the server: not reusable
        return False

    def _tls_usable(self) -> bool:
        """``usable`` for a TLS connection: ask the kernel first (``poll``, no exception and
        no timeout change on the common path); only when bytes wait, take them and decrypt
        without blocking: nothing but "want read" means they were only TLS 1.3 session
        tickets (still usable), anything else (EOF, alert, data) is not."""
        assert self.incoming is not None and self.tls is not None
        if not self.incoming.pending and not self.tls.pending():
            poller = self.poller
            if poller is None:
                poller = self.poller = select.poll()
                poller.register(self.sock.fileno(), select.POLLIN)
            if not poller.poll(0):
                return True
            self._settimeout(0.0)
            try:
                raw = self.sock.recv(_RECV)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not raw:
                return False
            self.incoming.write(raw)
        try:
            data = self.tls.read(_RECV)
        except ssl.SSLWantReadError:
            return True
        except (OSError, ValueError):
            return False
        if data:
            self.buf += data  # unexpected bytes: not reusable (park() refuses it too)
        return False

    def park(self) -> bool:
        """Prepare to sit idle in the pool (False: cannot be kept)."""
        return not self.eof and not self.buf

    def send(self, data: bytes, timeout: float | None) -> None:
        """Write ``data``; under TLS encrypted first, so one write of the head and body is
        one ``send`` of its records."""
        self._settimeout(timeout)
        try:
            if self.tls is not None:
                self.tls.write(data)
                data = self.outgoing.read()  # type: ignore[union-attr]
            self.sock.sendall(data)
        except TimeoutError:
            raise httpx.WriteTimeout("sending the request timed out") from None
        except OSError as exc:
            raise httpx.WriteError(
                f"write to {self.key[0]}:{self.key[1]} failed: {exc}") from exc

    def fill(self, timeout: float | None) -> None:
        """Wait for more bytes or EOF, at most ``timeout`` seconds."""
        self._settimeout(timeout)
        tls = self.tls
        if tls is not None:
            return self._tls_fill(tls)
        try:
            data = self.sock.recv(_RECV)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no response data within {timeout}s") from None
        except OSError as exc:
            raise httpx.ReadError(f"read from {self.key[0]}:{self.key[1]} failed: {exc}") from exc
        if data:
            self.buf += data
        else:
            self.eof = True

    def _tls_fill(self, tls: ssl.SSLObject) -> None:
        """``fill`` under TLS: decrypt what is already received, else ``recv`` (one system
        call for as many records as arrived) and decrypt; records without application data
        (session tickets) make it read again."""
        incoming = self.incoming
        assert incoming is not None
        try:
            if incoming.pending or tls.pending():
                try:
                    data = tls.read(_RECV)
                except ssl.SSLWantReadError:
                    data = None
                if data is not None:
                    self._tls_got(data)
                    return
            while True:
                raw = self.sock.recv(_RECV)
                if not raw:  # EOF without close_notify: a ragged EOF, taken as EOF
                    self.eof = True
                    return
                incoming.write(raw)
                try:
                    data = tls.read(_RECV)
                except ssl.SSLWantReadError:
                    continue
                self._tls_got(data)
                return
        except TimeoutError:
            raise httpx.ReadTimeout(f"no response data within {self.timeout}s") from None
        except ssl.SSLZeroReturnError:
            self.eof = True
        except OSError as exc:
            raise httpx.ReadError(f"read from {self.key[0]}:{self.key[1]} failed: {exc}") from exc

    def _tls_got(self, data: bytes) -> None:
        if data:
            self.buf += data
        else:  # close_notify
            self.eof = True

    def close(self) -> None:
        self.reusable = False
        try:
            self.sock.close()
        except OSError:
            pass


def _handshake(sock: socket.socket, ctx: ssl.SSLContext) -> tuple[Any, ...]:
    """A client TLS handshake over memory BIOs on the blocking ``sock`` (its timeout bounds
    each wait): ``(SSLObject, incoming, outgoing)``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            out = outgoing.read()
            if out:
                sock.sendall(out)
            raw = sock.recv(_RECV)
            if not raw:
                raise ConnectionResetError(
                    "connection closed during the TLS handshake") from None
            incoming.write(raw)
    out = outgoing.read()
    if out:
        sock.sendall(out)
    return obj, incoming, outgoing


def connect(key: Key, timeout: float | None, tls: TLSTarget | None = None) -> SyncConnection:
    """Open a connection; with ``tls`` (``(context, expected SPIFFE ID)``) complete a TLS
    handshake and check the server's identity (``meshlib.tls.verify_server``)."""
    try:
        sock = socket.create_connection(key[:2], timeout)
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connect to {key[0]}:{key[1]} timed out") from None
    except OSError as exc:
        raise httpx.ConnectError(f"connect to {key[0]}:{key[1]} failed: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    session = None
    if tls is not None:
        try:
            session = _handshake(sock, tls[0])
            verify_server(session[0], tls[1])
        except TimeoutError:
            sock.close()
            raise httpx.ConnectTimeout(
                f"TLS handshake with {key[0]}:{key[1]} timed out") from None
        except MtlsRefused as exc:
            sock.close()
            count_refusal("client", exc.reason)
            raise httpx.ConnectError(f"mesh mTLS to {key[0]}:{key[1]}: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise httpx.ConnectError(handshake_refusal(exc, f"{key[0]}:{key[1]}")) from exc
    return SyncConnection(sock, key, timeout, session)


# --------------------------------------------------------------------------- hedging


class ThreadAttempt:
    """One hedged attempt running on a pool thread.

    The worker publishes its connection (:meth:`publish`, before the exchange) and then checks
    ``cancelled``; the canceller sets ``cancelled`` and then shuts down the published
    connection's socket if it sees one. With both sides writing before reading, one of them
    always sees the other."""

    __slots__ = ("future", "conn", "cancelled")

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[Any] | None = None
        self.conn: SyncConnection | None = None
        self.cancelled = False

    def publish(self, conn: SyncConnection) -> None:
        self.conn = conn
        if self.cancelled:
            raise httpx.ReadError(f"attempt to {conn.key[0]}:{conn.key[1]} cancelled: another "
                                  "hedged attempt answered first")

    def result(self) -> Any:
        assert self.future is not None
        return self.future.result()

    def cancel(self) -> None:
        self.cancelled = True
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in the worker


class SyncHedges:
    """Runs the attempts of hedged calls on a thread pool of at most ``threads`` threads."""

    def __init__(self, threads: int = 64) -> None:
        self.threads = threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        ex = self._executor
        if ex is None:
            with self._lock:
                ex = self._executor
                if ex is None:
                    ex = self._executor = concurrent.futures.ThreadPoolExecutor(
                        self.threads, thread_name_prefix="meshlib-hedge")
        return ex

    def start(self, fn: Callable[..., Any], *args: Any) -> ThreadAttempt:
        """Run ``fn(*args, on_connection)`` on a pool thread; it returns
        ``(AttemptResult, seconds)``."""
        run = ThreadAttempt()
        run.future = self._pool().submit(fn, *args, run.publish)
        return run

    def wait_first(self, runs: Sequence[ThreadAttempt],
                   timeout: float | None) -> ThreadAttempt | None:
        """The first of ``runs`` to finish within ``timeout`` seconds, or None."""
        done, _ = concurrent.futures.wait([r.future for r in runs],  # type: ignore[misc]
                                          timeout, concurrent.futures.FIRST_COMPLETED)
        if not done:
            return None
        return next(r for r in runs if r.future in done)

    def cancel(self, run: ThreadAttempt) -> None:
        """Abandon a running attempt: its connection is closed, a late response too."""
        assert run.future is not None
        if not run.future.cancel():  # already running: shut its socket down
            run.cancel()
            run.future.add_done_callback(_close_result)

    def drop(self, value: Any) -> None:
        """Release a delivered response that will not be returned (the call failed)."""
        close_unread(value)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _close_result(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        close_unread(future.result()[0].value)
