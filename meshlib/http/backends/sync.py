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
    """One HTTP/1.1 connection over a blocking socket."""

    __slots__ = ("sock", "key", "buf", "eof", "reusable", "timeout", "tls", "poller")

    def __init__(self, sock: socket.socket, key: Key, timeout: float | None) -> None:
        self.sock = sock
        self.key = key
        self.buf = bytearray()
        self.eof = False
        self.reusable = True
        self.timeout = timeout  # the socket's current timeout
        self.tls = isinstance(sock, ssl.SSLSocket)
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
        if self.tls:
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
        """``usable`` for a TLS socket: ``SSLSocket.recv`` takes no flags, so first ask the
        kernel (``poll``, no exception on the common path); only when bytes wait, read at
        most one record without blocking: "want read" means it was only a TLS 1.3 session
        ticket (still usable), anything else (EOF, alert, data) is not."""
        sock = self.sock
        if not sock.pending():  # type: ignore[attr-defined]  # an SSLSocket here
            poller = self.poller
            if poller is None:
                poller = self.poller = select.poll()
                poller.register(sock.fileno(), select.POLLIN)
            if not poller.poll(0):
                return True
        self._settimeout(0.0)
        try:
            sock.recv(1)
        except ssl.SSLWantReadError:
            return True
        except OSError:
            return False
        return False

    def park(self) -> bool:
        """Prepare to sit idle in the pool (False: cannot be kept)."""
        return not self.eof and not self.buf

    def send(self, data: bytes, timeout: float | None) -> None:
        self._settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise httpx.WriteTimeout("sending the request timed out") from None
        except OSError as exc:
            raise httpx.WriteError(
                f"write to {self.key[0]}:{self.key[1]} failed: {exc}") from exc

    def fill(self, timeout: float | None) -> None:
        """Wait for more bytes or EOF, at most ``timeout`` seconds."""
        self._settimeout(timeout)
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

    def close(self) -> None:
        self.reusable = False
        try:
            self.sock.close()
        except OSError:
            pass


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
    if tls is not None:
        try:
            sock = tls[0].wrap_socket(sock)
            verify_server(sock, tls[1])
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
    return SyncConnection(sock, key, timeout)


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
