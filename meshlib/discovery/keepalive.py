"""One long-lived ``LeaseKeepAlive`` stream per client, shared by every lease it keeps.

Why (issue 10): ``LeaseKeepAlive`` is a bidirectional stream. etcd's own clients (``clientv3``
``lessor.sendKeepAliveLoop``, ``etcdctl lease keep-alive``) open it once and send a
``LeaseKeepAliveRequest{ID}`` on it every TTL/3, reading ``LeaseKeepAliveResponse{ID, TTL}``
answers from the same stream. An earlier meshlib opened a new stream per keepalive and cancelled
it after the answer: direct to etcd that works, but ``etcd grpc-proxy`` ties its keepalive of a
lease to the client stream that asked first, so cancelling that stream made later keepalives
fail (``UNKNOWN: context canceled``) and the lease expired every ~11 s behind the proxy.

Algorithm:

* The stream is opened lazily on the first :meth:`KeepAliveStream.keepalive` and kept open; it
  is placed on one etcd endpoint (:meth:`EtcdClient.stream_channel`), chosen by the client's
  rotation, so a stream never lands on an endpoint that has just failed.
* ``keepalive(lease_id, timeout)`` registers a waiter for ``lease_id``, puts the request on the
  stream's request queue and waits for the answer carrying that ID (answers for one lease come in
  request order; every waiter of that ID is woken by the next answer, which is at least as fresh).
* An answer with ``TTL <= 0`` means the lease is gone: :class:`LeaseNotFound`.
* A stream that ends (member down, proxy killed) fails every waiter at once with
  :class:`EtcdUnavailable`; a stream that does not answer within ``timeout`` is declared *silent*
  (a SIGSTOPped member or proxy keeps its TCP connection, so nothing else would notice) and is
  cancelled. Either way the next keepalive opens a new stream on the *next* endpoint. When the
  watch stream finds an endpoint hung first, :meth:`KeepAliveStream.abandon` leaves it at once.
  The caller (``LeaseKeeper``) retries failed keepalives within the TTL with a short backoff.

Threads: the caller's thread sends and waits; one reader thread per open stream turns the
blocking response iterator into waiter wake-ups. The request side is a generator fed from a
``queue.Queue`` and ended with a sentinel, so grpc's request-consumer thread never blocks past the
stream's end. No lock is held across I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

from .etcd_client import EtcdError, EtcdUnavailable, LeaseNotFound, RequestQueue

if TYPE_CHECKING:
    from .etcd_client import EtcdClient

__all__ = ["KeepAliveStream"]

log = logging.getLogger("meshlib.discovery")


class _Waiter:
    __slots__ = ("done", "ttl", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ttl: int | None = None
        self.error: EtcdError | None = None


class _Stream:
    """One open LeaseKeepAlive call, its request queue and the waiters of its leases."""

    def __init__(self, call: Any, requests: RequestQueue, endpoint: str) -> None:
        self.call = call
        self.requests = requests
        self.endpoint = endpoint
        self.waiters: dict[int, list[_Waiter]] = {}
        self.ended: EtcdError | None = None
        self.opened = time.monotonic()


class KeepAliveStream:
    """The client's shared keepalive stream (see the module docstring).

    >>> ka = KeepAliveStream(client)                    # doctest: +SKIP
    >>> ka.keepalive(lease_id, timeout=1.5)              # remaining TTL in seconds
    10
    """

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._closed = False
        #: How many streams were opened so far (1 while the first one holds).
        self.streams_opened = 0

    def keepalive(self, lease_id: int, timeout: float) -> int:
        """Send one keepalive for ``lease_id`` and wait for its answer; returns the TTL.

        Raises :class:`LeaseNotFound` when etcd says the lease is gone and
        :class:`EtcdUnavailable` when the stream ended or stayed silent for ``timeout``.
        """
        waiter = _Waiter()
        with self._lock:
            if self._closed:
                raise EtcdError(f"etcd lease_keepalive lease {lease_id:x}: client is closed")
            s = self._stream
            if s is None or s.ended is not None:
                s = self._stream = self._open()
            s.waiters.setdefault(lease_id, []).append(waiter)
        s.requests.put(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
        if not waiter.done.wait(timeout):
            self._fail(
                s,
                EtcdUnavailable(
                    f"etcd lease_keepalive lease {lease_id:x}: no answer from {s.endpoint} "
                    f"within {timeout:.1f}s; the stream is silent, reopening it on the next "
                    f"endpoint"
                ),
                silent=True,
            )
        if waiter.error is not None:
            raise waiter.error
        ttl = waiter.ttl or 0
        if ttl <= 0:
            raise LeaseNotFound(f"etcd lease_keepalive lease {lease_id:x}: lease not found (TTL 0)")
        return ttl

    def abandon(self, endpoint: str) -> None:
        """End the open stream if it is on ``endpoint`` (found hung by another stream): its
        waiters fail at once and the next keepalive opens a stream on the next endpoint."""
        with self._lock:
            s = self._stream
        if s is not None and s.endpoint == endpoint:
            self._fail(
                s, EtcdUnavailable(f"etcd lease keepalive stream to {endpoint}: endpoint is hung")
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            s, self._stream = self._stream, None
        if s is not None:
            self._fail(s, EtcdError("etcd lease keepalive stream: client is closed"))

    # ------------------------------------------------------------------ internals
    def _open(self) -> _Stream:
        """Open a stream on the client's current stream endpoint (called under the lock)."""
        channel, endpoint = self._client.stream_channel()
        requests = RequestQueue()
        call = rpc_pb2_grpc.LeaseStub(channel).LeaseKeepAlive(iter(requests))
        s = _Stream(call, requests, endpoint)
        self.streams_opened += 1
        threading.Thread(
            target=self._read, args=(s,), name="meshlib-etcd-keepalive-reader", daemon=True
        ).start()
        log.debug("etcd lease keepalive stream opened on %s", endpoint)
        return s

    def _read(self, s: _Stream) -> None:
        err: EtcdError
        try:
            for resp in s.call:
                with self._lock:
                    waiters = s.waiters.pop(resp.ID, [])
                for w in waiters:
                    w.ttl = int(resp.TTL)
                    w.done.set()
            err = EtcdUnavailable(f"etcd lease keepalive stream to {s.endpoint} ended")
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            err = EtcdUnavailable(
                f"etcd lease keepalive stream to {s.endpoint} failed: "
                f"{code.name if code else 'UNKNOWN'}: {details}"
            )
        except Exception as e:  # pragma: no cover - defensive: never leave waiters hanging
            err = EtcdUnavailable(f"etcd lease keepalive stream to {s.endpoint} failed: {e!r}")
        self._fail(s, err)

    def _fail(self, s: _Stream, err: EtcdError, *, silent: bool = False) -> None:
        """End stream ``s`` (once): wake its waiters with ``err``; the next call reopens."""
        with self._lock:
            first = s.ended is None
            if first:
                s.ended = err
            waiters = [w for ws in s.waiters.values() for w in ws]
            s.waiters.clear()
            if self._stream is s:
                self._stream = None
        for w in waiters:
            if not w.done.is_set():
                w.error = err
                w.done.set()
        if not first:
            return
        s.requests.end()
        s.call.cancel()
        if not self._closed:
            self._client.stream_failed(s.endpoint, silent=silent)
