"""Prefix watches over one multiplexed etcd Watch stream that resumes without losing events.

Algorithm (etcd API guarantees, "Watch API" in the etcd v3 docs; the resume rules follow
etcd's own ``clientv3`` watcher):

* A watch starts with a consistent read of its prefix at revision ``R`` (``on_reset``), then a
  watch created with ``start_revision = R + 1`` (inclusive) delivers every later change in
  revision order (``on_events``). Per watch we keep ``next_rev`` = last revision seen + 1.
* Events advance ``next_rev`` to their last ``mod_revision`` + 1; events below ``next_rev`` are
  dropped, so a resumed stream never duplicates. A per-watch progress notification (no events,
  our ``watch_id``) advances it to ``header.revision + 1``; etcd only sends those to watchers that
  are fully synced, ordered with their events. The stream-wide answer to a ``progress_request``
  (``watch_id == -1``) is used for liveness only: in etcd < 3.5.8 its revision can be ahead of
  events not yet delivered to unsynced watchers (etcd-io/etcd#15220).
* After any stream failure every watch is re-created from its ``next_rev`` on a new stream. If
  etcd answers that revision was compacted (``canceled`` with ``compact_revision``), the prefix is
  read again and ``on_reset`` receives the full new content (the caller diffs against its cache,
  which also reveals deletes lost to compaction); the watch restarts from that read's revision + 1.
* One create is outstanding per stream at a time, as in ``clientv3`` (``watchGrpcStream.run``
  sends the head of its ``resuming`` queue and the next one only once ``created`` arrived), so a
  ``created`` answer always belongs to the one pending create and its ``watch_id`` is that
  watch's id. Pairing several outstanding creates with answers first-in first-out is wrong
  behind etcd's grpc-proxy (``server/proxy/grpcproxy``): it numbers a stream's watches 0, 1, 2...
  in request order but answers ``created`` out of that order: at once for a watch that joins an
  existing server watcher (``watchBroadcast.add``), and for a new one when etcd has answered the
  server watch it opens from its own goroutine (``newWatchBroadcast``). Measured (etcd 3.5.1):
  of 1,000 creates sent at once, 8-35 answers came out of order, mostly adjacent pairs swapped;
  direct to etcd, none. Client-chosen ids
  (``WatchCreateRequest.watch_id``, etcd >= 3.4) are no way out: the proxy ignores the field and
  answers with its own numbering (and the generated stubs here predate it), and relying on the
  numbering itself is undocumented and cannot place a refused create (answered with id -1 or 0).
  The Range reads of the next watches go on while a create is outstanding (one read per turn of
  the manager loop, answers handled in between), so 1,000 watches still sync in about the time
  of their 1,000 reads.
* The stream is opened with the metadata ``hasleader: true`` so a member that loses its leader
  cancels the stream instead of going quiet. Every ``progress_interval`` we send a
  ``progress_request`` (etcd >= 3.4); if nothing arrives for 3 intervals the stream is declared
  silent (SIGSTOPped member, half-open partition), cancelled and reopened. Behind etcd's
  grpc-proxy, which ignores progress requests, only unanswered watch creates count as silence. Reopening backs off
  50 ms doubling to 1 s, reset once a stream has answered.

Threads: one manager thread owns all watch state and runs every callback; one short-lived reader
thread per stream turns the blocking response iterator into messages on the manager's inbox. The
request side of the bidi stream is a generator fed from a ``queue.Queue`` and ended with a
sentinel, so grpc's request-consumer thread never blocks past the stream's end. Resets and creates
wait until the stream has answered once (or for 0.5 s: etcd's grpc-proxy answers nothing before a
create), so an unreachable etcd, whose stream fails at once, costs no read timeouts.
``close()`` joins the manager thread for up to 2 s; a thread busy in a user callback or in a
reset read (bounded by the client's timeout) finishes that first, as a daemon thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from etcd3.etcdrpc import rpc_pb2

from .etcd_client import KV, EtcdClient, EtcdError, Event, _b, event_from_pb, prefix_range_end

__all__ = ["WatchManager", "WatchHandle", "Event", "KV"]

log = logging.getLogger("meshlib.discovery")

OnReset = Callable[[list[KV], int], None]
OnEvents = Callable[[list[Event], int], None]

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0
_STALL_FACTOR = 3.0
_BATCH = 256  # inbox items handled per turn of the manager loop


@dataclass(eq=False)
class _Watch:
    wid: int
    prefix: str
    on_reset: OnReset
    on_events: OnEvents
    key: bytes = b""
    range_end: bytes = b""
    next_rev: int = 0
    need_reset: bool = True
    stream: int = 0  # generation of the stream this watch is created on (0: none)
    server_id: int | None = None
    cancelled: bool = False
    resets: int = field(default=0)


class WatchHandle:
    """Returned by :meth:`WatchManager.watch_prefix`; ``cancel()`` stops the watch."""

    def __init__(self, manager: WatchManager, watch: _Watch) -> None:
        self._manager = manager
        self._watch = watch

    @property
    def prefix(self) -> str:
        return self._watch.prefix

    @property
    def revision(self) -> int:
        """Last revision delivered to this watch (0 before the first reset)."""
        return max(0, self._watch.next_rev - 1)

    @property
    def active(self) -> bool:
        return not self._watch.cancelled

    def cancel(self) -> None:
        self._manager._cancel(self._watch)

    def __repr__(self) -> str:
        return f"WatchHandle({self.prefix!r}, revision={self.revision}, active={self.active})"


class _StreamEnded(Exception):
    pass


class WatchManager:
    """Background thread owning one etcd Watch stream shared by many prefix watches.

    >>> wm = WatchManager(client, progress_interval=1.0)          # doctest: +SKIP
    >>> h = wm.watch_prefix("/meshlib/v1/services/orders/", on_reset, on_events)
    >>> wm.connected, wm.last_contact
    (True, 1234.5)
    >>> h.cancel(); wm.close()
    """

    def __init__(
        self,
        client: EtcdClient,
        *,
        progress_interval: float = 1.0,
        on_state: Callable[[bool], None] | None = None,
        name: str = "meshlib-etcd-watch",
    ) -> None:
        if progress_interval <= 0:
            raise ValueError(f"progress_interval must be > 0, got {progress_interval!r}")
        self._client = client
        self._interval = float(progress_interval)
        self._on_state = on_state
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._lock = threading.Lock()
        self._watches: dict[int, _Watch] = {}
        self._ids = itertools.count(1)
        self._dirty = True
        self._closing = threading.Event()
        self._connected = False
        self._last_contact: float | None = None
        self._stream_member_id = 0
        self._gen = 0
        self._streams_opened = 0
        self._down_since: float | None = None
        self._progress_supported = False
        self._down_logged = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    @property
    def connected(self) -> bool:
        """True while the stream is healthy (it has answered and not failed since)."""
        return self._connected

    @property
    def last_contact(self) -> float | None:
        """``time.monotonic()`` of the last message from etcd, None before the first."""
        return self._last_contact

    @property
    def stream_member_id(self) -> int:
        """etcd member id that serves the current stream (from response headers; 0 if unknown)."""
        return self._stream_member_id

    @property
    def streams_opened(self) -> int:
        """How many Watch streams have been opened so far (a reconnect counter)."""
        return self._streams_opened

    def watch_prefix(self, prefix: str, on_reset: OnReset, on_events: OnEvents) -> WatchHandle:
        """Watch every key under ``prefix``: ``on_reset`` with the full content, then events."""
        if self._closing.is_set():
            raise RuntimeError("WatchManager is closed")
        key = _b(prefix) if prefix else b"\0"
        w = _Watch(
            wid=next(self._ids), prefix=prefix, on_reset=on_reset, on_events=on_events,
            key=key, range_end=prefix_range_end(_b(prefix)),
        )
        with self._lock:
            self._watches[w.wid] = w
            self._dirty = True
        self._inbox.put(("wake",))
        return WatchHandle(self, w)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and the stream; returns once the thread has ended (or ``timeout``)."""
        self._closing.set()
        self._inbox.put(("wake",))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("etcd watch thread did not stop within %.1fs (in a callback?)", timeout)

    def __enter__(self) -> WatchManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _cancel(self, w: _Watch) -> None:
        if w.cancelled:
            return
        w.cancelled = True
        with self._lock:
            self._dirty = True
        self._inbox.put(("wake",))

    def _set_connected(self, value: bool) -> None:
        if self._connected == value:
            return
        self._connected = value
        if value:
            log.info("etcd watch stream connected (member %x)", self._stream_member_id)
        if self._on_state is not None:
            try:
                self._on_state(value)
            except Exception:
                log.exception("etcd watch on_state(%s) callback failed", value)

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._closing.is_set():
            healthy = False
            try:
                healthy = self._session()
            except EtcdError as e:
                log.warning("etcd watch: %s; reopening the stream", e)
            except Exception:
                log.exception("etcd watch stream failed unexpectedly; reopening")
            self._set_connected(False)
            if self._closing.is_set():
                break
            if healthy:
                backoff = _BACKOFF_MIN
            self._closing.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
        self._set_connected(False)

    def _session(self) -> bool:
        """Run one Watch stream until it fails or we close; True if it ever answered."""
        self._gen += 1
        gen = self._gen
        with self._lock:
            self._dirty = True  # every watch must be created on the new stream
        requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()

        def request_iter() -> Iterator[rpc_pb2.WatchRequest]:
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        requests.put(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        call = self._client.watch_stub.Watch(request_iter(), metadata=[("hasleader", "true")])
        self._streams_opened += 1
        reader = threading.Thread(
            target=self._read, args=(call, gen), name=f"{self._thread.name}-reader", daemon=True
        )
        reader.start()
        stream = _Stream(gen=gen, requests=requests, opened=time.monotonic())
        try:
            self._drive(stream)
        except _StreamEnded:
            pass
        finally:
            requests.put(None)
            call.cancel()
            reader.join(2.0)
            for w in self._snapshot():
                if w.stream == gen:
                    w.stream = 0
                    w.server_id = None
        return stream.healthy

    def _read(self, call: Any, gen: int) -> None:
        try:
            for resp in call:
                self._last_contact = time.monotonic()
                self._inbox.put(("resp", gen, resp))
            self._inbox.put(("end", gen, None))
        except grpc.RpcError as e:
            self._inbox.put(("end", gen, e))
        except Exception as e:  # pragma: no cover - defensive
            self._inbox.put(("end", gen, e))

    def _snapshot(self) -> list[_Watch]:
        with self._lock:
            return list(self._watches.values())

    def _drive(self, s: _Stream) -> None:
        last_progress = time.monotonic()
        while not self._closing.is_set():
            now = time.monotonic()
            if self._dirty and (s.healthy or now - s.opened >= min(0.5, self._interval)):
                self._plan(s)
            if s.todo:
                self._read_next(s)  # one read per turn: answers to creates are handled between
                now = time.monotonic()
            if now - last_progress >= self._interval:
                s.requests.put(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
                last_progress = now
            heard = self._heard_reference(s)
            if heard is not None and now - heard > _STALL_FACTOR * self._interval:
                log.warning(
                    "etcd watch stream silent for %.1fs (member %x); reopening",
                    now - heard, self._stream_member_id,
                )
                return
            wait = min(self._interval - (now - last_progress), self._interval)
            try:
                if s.todo:
                    item = self._inbox.get_nowait()
                else:
                    item = self._inbox.get(timeout=max(0.01, wait))
            except queue.Empty:
                continue
            # Take what has arrived (bounded) before the next read, so a 'created' queued behind
            # wake-ups or events does not hold up the next create.
            for n in itertools.count(1):
                if item[0] != "wake" and item[1] == s.gen:
                    if item[0] == "end":
                        if not self._closing.is_set():
                            self._log_end(s, item[2])
                        return
                    self._handle(s, item[2])
                if n >= _BATCH:
                    break
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break

    def _heard_reference(self, s: _Stream) -> float | None:
        """Since when an answer is owed on this stream, or None if silence proves nothing.

        A server that has answered ``progress_request`` (etcd >= 3.4) owes an answer every
        interval. Otherwise (etcd's grpc-proxy ignores progress requests, and server-side progress
        notifications default to every 10 min) only an outstanding watch create is owed one.
        """
        if s.progress_ok:
            return max(s.opened, self._last_contact or 0.0)
        if self._progress_supported and not s.healthy:
            return s.opened
        if s.pending is not None:
            return s.pending[1]
        return None

    def _log_end(self, s: _Stream, err: BaseException | None) -> None:
        """Warn when a healthy stream breaks; while etcd stays unreachable, warn every 30 s."""
        detail = (
            f"{err.code().name}: {err.details()}"
            if isinstance(err, grpc.RpcError) and hasattr(err, "code")
            else repr(err)
        )
        now = time.monotonic()
        where = ", ".join(self._client.endpoints)
        if s.healthy:
            self._down_since = now
            self._down_logged = now
            log.warning("etcd watch stream to [%s] ended (%s); reopening", where, detail)
        elif self._down_since is None or now - self._down_logged >= 30.0:
            if self._down_since is None:
                self._down_since = now
            self._down_logged = now
            log.warning(
                "etcd watch: cannot open a stream to [%s] for %.0fs (%s); still retrying",
                where, now - self._down_since, detail,
            )
        else:
            log.debug("etcd watch stream to [%s] failed (%s); retrying", where, detail)

    def _plan(self, s: _Stream) -> None:
        """Queue watches that are not on this stream; cancel cancelled ones that are."""
        with self._lock:
            self._dirty = False
            watches = list(self._watches.values())
        for w in watches:
            if w.cancelled:
                if w.stream != s.gen:
                    self._forget(w)
                elif w.server_id is not None:
                    s.requests.put(
                        rpc_pb2.WatchRequest(
                            cancel_request=rpc_pb2.WatchCancelRequest(watch_id=w.server_id)
                        )
                    )
                    s.by_server_id.pop(w.server_id, None)
                    self._forget(w)
                # else queued (dropped when dequeued) or pending (cancelled once created)
                continue
            if w.stream == s.gen:
                continue
            w.stream = s.gen
            w.server_id = None
            s.todo.append(w)

    def _read_next(self, s: _Stream) -> None:
        """Reset (read) the next queued watch if it needs it, then queue its create."""
        w = s.todo.popleft()
        if not w.cancelled and w.need_reset:
            self._reset(w)  # EtcdError propagates: the session ends and is retried
        if w.cancelled:
            self._forget(w)
            return
        s.ready.append(w)
        self._send_create(s)

    def _send_create(self, s: _Stream) -> None:
        """Send the next ready create unless one is still waiting for its ``created``."""
        while s.pending is None and s.ready:
            w = s.ready.popleft()
            if w.cancelled:
                self._forget(w)
                continue
            s.requests.put(
                rpc_pb2.WatchRequest(
                    create_request=rpc_pb2.WatchCreateRequest(
                        key=w.key, range_end=w.range_end, start_revision=w.next_rev,
                        progress_notify=True,
                    )
                )
            )
            s.pending = (w, time.monotonic())

    def _forget(self, w: _Watch) -> None:
        with self._lock:
            self._watches.pop(w.wid, None)

    def _reset(self, w: _Watch) -> None:
        kvs, rev = self._client.get_prefix(w.prefix)
        w.need_reset = False
        w.next_rev = rev + 1
        w.resets += 1
        if w.cancelled:
            return
        try:
            w.on_reset(kvs, rev)
        except Exception:
            log.exception("etcd watch %r: on_reset callback failed at revision %d", w.prefix, rev)

    def _handle(self, s: _Stream, resp: rpc_pb2.WatchResponse) -> None:
        if resp.header.member_id:
            self._stream_member_id = resp.header.member_id
        if not s.healthy:
            s.healthy = True
            self._down_since = None
            self._set_connected(True)
        wid = resp.watch_id
        if wid == -1 and not resp.created and not resp.canceled:
            s.progress_ok = True
            self._progress_supported = True
        if resp.created:
            self._created(s, resp)
            return
        if resp.canceled:
            w2 = s.by_server_id.pop(wid, None)
            if w2 is None or w2.cancelled:
                return
            w2.stream = 0
            w2.server_id = None
            with self._lock:
                self._dirty = True
            if resp.compact_revision > 0:
                log.info(
                    "etcd watch %r: revision %d compacted (compact revision %d); rereading",
                    w2.prefix, w2.next_rev, resp.compact_revision,
                )
                w2.need_reset = True
                return
            log.warning(
                "etcd watch %r canceled by etcd: %s; reopening the stream",
                w2.prefix, resp.cancel_reason or "no reason given",
            )
            s.healthy = False  # keep backing off if etcd keeps refusing the watch
            raise _StreamEnded()
        w3 = s.by_server_id.get(wid)
        if w3 is None or w3.cancelled:
            return  # stream-wide progress answer (watch_id -1) or a cancelled watch
        if not resp.events:
            w3.next_rev = max(w3.next_rev, resp.header.revision + 1)
            return
        events = [event_from_pb(e) for e in resp.events if e.kv.mod_revision >= w3.next_rev]
        if not events:
            return
        rev = events[-1].kv.mod_revision
        w3.next_rev = rev + 1
        try:
            w3.on_events(events, rev)
        except Exception:
            log.exception("etcd watch %r: on_events callback failed at revision %d", w3.prefix, rev)

    def _created(self, s: _Stream, resp: rpc_pb2.WatchResponse) -> None:
        """``created`` answers the one outstanding create; then the next create goes out."""
        wid = resp.watch_id
        if s.pending is None:
            log.warning("etcd watch: 'created' for watch id %d with no create outstanding", wid)
            return
        w = s.pending[0]
        s.pending = None
        if resp.canceled:  # etcd refused the create (permission denied, invalid range)
            w.stream = 0
            with self._lock:
                self._dirty = True
            if w.cancelled:
                self._send_create(s)
                return
            log.warning(
                "etcd watch %r: create refused by etcd (watch id %d): %s; reopening the stream",
                w.prefix, wid, resp.cancel_reason or "no reason given",
            )
            s.healthy = False
            raise _StreamEnded()
        other = s.by_server_id.get(wid)
        if other is not None:
            log.warning(
                "etcd watch %r: etcd reused watch id %d of %r on one stream; reopening the stream",
                w.prefix, wid, other.prefix,
            )
            raise _StreamEnded()
        w.server_id = wid
        s.by_server_id[wid] = w
        if w.cancelled:
            with self._lock:
                self._dirty = True
        self._send_create(s)


@dataclass(eq=False)
class _Stream:
    gen: int
    requests: queue.Queue[rpc_pb2.WatchRequest | None]
    opened: float
    healthy: bool = False
    progress_ok: bool = False  # the server answered a progress_request on this stream
    todo: deque[_Watch] = field(default_factory=deque)  # to read (if need_reset), then create
    ready: deque[_Watch] = field(default_factory=deque)  # read; create not sent yet
    pending: tuple[_Watch, float] | None = None  # the one create sent, and when
    by_server_id: dict[int, _Watch] = field(default_factory=dict)
