"""Prefix watches over one multiplexed etcd Watch stream that resumes without losing events.

This module is the *driver*: the gRPC stream, the threads, the reads and the user callbacks. What
to do with each answer (resume from ``next_rev``, drop duplicates, re-list after compaction, pair
``created`` answers with the one outstanding create, when a stream is silent) is decided by the
sans-I/O state machine in :mod:`meshlib.discovery.watch_state`, whose docstring gives the rules
and their sources.

Driving one stream:

* A watch starts with a consistent read of its prefix at revision ``R`` (``on_reset``), then a
  watch created with ``start_revision = R + 1`` delivers every later change (``on_events``).
  The Range reads of the next watches go on while a create is outstanding (one read per turn of
  the manager loop, answers handled in between), so 1,000 watches sync in about the time of their
  1,000 reads.
* The stream is opened with the metadata ``hasleader: true`` so a member that loses its leader
  cancels the stream instead of going quiet. It is *placed* on one endpoint
  (:meth:`EtcdClient.stream_channel`); when it ends or goes silent the client moves new streams
  to the next endpoint (:meth:`EtcdClient.stream_failed`), so a SIGSTOPped member or proxy, whose
  TCP connection stays up, is not picked again at once.
* Liveness (the bound documented in docs/discovery.md): every ``progress_interval`` a
  ``progress_request`` is sent (etcd >= 3.4 answers it at once); behind etcd's grpc-proxy, which
  ignores progress requests, a probe create instead. A question left unanswered for
  ``max(progress_interval, 1 s)`` makes the stream silent: it is cancelled and reopened on the next
  endpoint, where every watch resumes from its ``next_rev``. So a hung member or proxy keeps the
  stream at most ``progress_interval + max(progress_interval, 1 s)`` (2 s by default), plus one
  reconnect.
* Reopening backs off 50 ms doubling to 1 s, reset once a stream has answered. Reads wait
  until the stream has answered once (or for 0.5 s: etcd's grpc-proxy answers nothing before a
  create), so an unreachable etcd, whose stream fails at once, costs no read timeouts; creates of
  resumed watches (no read needed) go out at once.

Threads: one manager thread owns all watch state and runs every callback; one short-lived reader
thread per stream turns the blocking response iterator into messages on the manager's inbox. The
request side of the bidi stream is a generator fed from a ``queue.Queue`` and ended with a
sentinel, so grpc's request-consumer thread never blocks past the stream's end. ``close()`` joins
the manager thread for up to 2 s; a thread busy in a user callback or in a reset read (bounded by
the client's timeout) finishes that first, as a daemon thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

from meshlib.telemetry import metrics

from .etcd_client import KV, EtcdClient, EtcdError, Event, RequestQueue, _b, prefix_range_end
from .watch_state import (
    Action,
    Cancel,
    Create,
    Deliver,
    End,
    Forget,
    Relisted,
    StreamState,
    WatchState,
)

__all__ = ["WatchManager", "WatchHandle", "Event", "KV", "ANSWER_LIMIT_MIN"]

log = logging.getLogger("meshlib.discovery")

OnReset = Callable[[list[KV], int], None]
OnEvents = Callable[[list[Event], int], None]

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0
#: A liveness question unanswered for max(progress_interval, ANSWER_LIMIT_MIN) seconds means the
#: stream is silent. Questions go out every progress_interval, so a hung endpoint is left within
#: progress_interval + max(progress_interval, ANSWER_LIMIT_MIN): 2 s by default.
ANSWER_LIMIT_MIN = 1.0
_BATCH = 256  # inbox items handled per turn of the manager loop
#: A wait that ends this much later than asked means the process itself was not running.
_STARVED = 0.25
_DOWN_LOG_EVERY = 30.0


class WatchHandle:
    """Returned by :meth:`WatchManager.watch_prefix`; ``cancel()`` stops the watch."""

    def __init__(self, manager: WatchManager, watch: WatchState) -> None:
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
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Session:
    """The I/O side of one stream: its request queue, endpoint and sans-I/O state."""

    def __init__(self, state: StreamState, requests: RequestQueue, endpoint: str) -> None:
        self.state = state
        self.requests = requests
        self.endpoint = endpoint


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
        self._watches: dict[int, WatchState] = {}
        self._ids = itertools.count(1)
        self._dirty = True
        self._closing = threading.Event()
        self._connected = False
        self._last_contact: float | None = None
        self._stream_member_id = 0
        self._gen = 0
        self._streams_opened = 0
        self._open_reason = "start"
        self._progress_supported = False
        self._down_since: float | None = None  # monotonic; None while a stream is healthy
        self._down_since_wall = 0.0
        self._down_logged = 0.0
        self._errors: dict[str, str] = {}  # endpoint -> last error, while down
        self._endpoint = ""
        self._opens = metrics.cached_children(metrics.WATCH_STREAMS_OPENED)
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
    def stream_endpoint(self) -> str:
        """The endpoint (member or proxy address) of the current or last stream."""
        return self._endpoint

    @property
    def streams_opened(self) -> int:
        """How many Watch streams have been opened so far (a reconnect counter)."""
        return self._streams_opened

    @property
    def down_since(self) -> float | None:
        """``time.time()`` since when no stream has answered, None while one is healthy."""
        return None if self._down_since is None else self._down_since_wall

    @property
    def answer_limit(self) -> float:
        """Seconds a liveness question may stay unanswered before the stream is silent."""
        return max(self._interval, ANSWER_LIMIT_MIN)

    @property
    def detection_bound(self) -> float:
        """Longest time a hung (silent) endpoint keeps the stream: one interval until the next
        question, plus the answer limit."""
        return self._interval + self.answer_limit

    def watch_prefix(self, prefix: str, on_reset: OnReset, on_events: OnEvents) -> WatchHandle:
        """Watch every key under ``prefix``: ``on_reset`` with the full content, then events."""
        if self._closing.is_set():
            raise RuntimeError("WatchManager is closed")
        w = WatchState(
            wid=next(self._ids), prefix=prefix, key=_b(prefix) if prefix else b"\0",
            range_end=prefix_range_end(_b(prefix)), on_reset=on_reset, on_events=on_events,
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
    def _cancel(self, w: WatchState) -> None:
        if w.cancelled:
            return
        w.cancelled = True
        self._mark_dirty()
        self._inbox.put(("wake",))

    def _mark_dirty(self) -> None:
        with self._lock:
            self._dirty = True

    def _set_connected(self, value: bool) -> None:
        if self._connected == value:
            return
        self._connected = value
        if value:
            log.info(
                "etcd watch stream connected to %s (member %x)",
                self._endpoint, self._stream_member_id,
            )
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
                self._open_reason = "error"
                self._note_down(self._endpoint, str(e))
                log.warning("etcd watch: %s; reopening the stream", e)
            except Exception:
                self._open_reason = "error"
                log.exception("etcd watch stream failed unexpectedly; reopening")
            self._set_connected(False)
            if self._closing.is_set():
                break
            if healthy:
                backoff = _BACKOFF_MIN
            self._closing.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
        self._set_connected(False)
        if self._endpoint:
            metrics.untrack_watch_stream(self._endpoint)

    def _session(self) -> bool:
        """Run one Watch stream until it fails or we close; True if it ever answered."""
        self._gen += 1
        gen = self._gen
        self._mark_dirty()  # every watch must be created on the new stream
        requests = RequestQueue()
        requests.put(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        channel, endpoint = self._client.stream_channel()
        metrics.track_watch_stream(self, endpoint, self._endpoint)
        self._endpoint = endpoint
        call = rpc_pb2_grpc.WatchStub(channel).Watch(
            iter(requests), metadata=[("hasleader", "true")]
        )
        self._streams_opened += 1
        self._opens(self._open_reason).inc()  # type: ignore[attr-defined]
        reader = threading.Thread(
            target=self._read, args=(call, gen), name=f"{self._thread.name}-reader", daemon=True
        )
        reader.start()
        s = _Session(StreamState(gen=gen, opened=time.monotonic()), requests, endpoint)
        if self._progress_supported:  # etcd itself (not a proxy): the first request is owed too
            s.state.asked(s.state.opened, None)
        try:
            self._drive(s)
        except _StreamEnded as e:
            self._open_reason = e.reason
            if e.reason in ("ended", "silent"):
                self._client.stream_failed(endpoint, silent=e.reason == "silent")
        finally:
            requests.end()
            call.cancel()
            reader.join(2.0)
            for w in self._snapshot():
                if w.stream == gen:
                    w.stream = 0
                    w.server_id = None
        return s.state.healthy

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

    def _snapshot(self) -> list[WatchState]:
        with self._lock:
            return list(self._watches.values())

    def _drive(self, s: _Session) -> None:
        st = s.state
        last_progress = time.monotonic()
        limit = self.answer_limit
        while not self._closing.is_set():
            now = time.monotonic()
            if self._dirty:
                with self._lock:
                    self._dirty = False
                    watches = list(self._watches.values())
                self._apply(s, st.plan(watches))
            # Reads wait for the stream's first answer (or 0.5 s, as grpc-proxy answers nothing
            # before a create), so an unreachable etcd costs no read timeouts. Resumed watches
            # need no read: their creates go out at once.
            read_at = st.opened + min(0.5, self._interval)
            can_read = st.healthy or now >= read_at
            if st.todo and (can_read or not st.todo[0].need_reset):
                self._read_next(s)  # one read per turn: answers to creates are handled between
                now = time.monotonic()
            if now - last_progress >= self._interval:
                self._send(s, rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
                last_progress = now
                if st.progress_ok:
                    st.asked(now, self._last_contact)
                elif st.healthy:
                    probe = st.probe(now)
                    if probe is not None:
                        self._apply(s, [probe])
            owed = st.owed_since(self._last_contact)
            if owed is not None and now - owed > limit:
                self._note_down(s.endpoint, f"silent for {now - owed:.1f}s")
                log.warning(
                    "etcd watch stream to %s (member %x): no answer for %.1fs (limit %.1fs); "
                    "the endpoint is hung or partitioned, reopening on the next endpoint",
                    s.endpoint, self._stream_member_id, now - owed, limit,
                )
                raise _StreamEnded("silent")
            wait = self._interval - (now - last_progress)
            if owed is not None:
                wait = min(wait, owed + limit - now + 0.001)
            if st.todo and not st.healthy:
                wait = min(wait, read_at - now + 0.001)
            timeout = max(0.01, wait)
            try:
                if st.todo and (st.healthy or now >= read_at or not st.todo[0].need_reset):
                    item = self._inbox.get_nowait()
                else:
                    item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                late = time.monotonic() - (now + timeout)
                if late > _STARVED:
                    # This process did not run for `late` seconds (CPU starvation, a GC or
                    # swap pause); the reader thread could not record answers meanwhile either.
                    st.excuse(late)
                continue
            # Take what has arrived (bounded) before the next read, so a 'created' queued behind
            # wake-ups or events does not hold up the next create.
            for n in itertools.count(1):
                if item[0] != "wake" and item[1] == st.gen:
                    if item[0] == "end":
                        if not self._closing.is_set():
                            self._log_end(s, item[2])
                        raise _StreamEnded("ended")
                    self._handle(s, item[2])
                if n >= _BATCH:
                    break
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break

    def _handle(self, s: _Session, resp: rpc_pb2.WatchResponse) -> None:
        st = s.state
        if resp.header.member_id:
            self._stream_member_id = resp.header.member_id
        was_healthy = st.healthy
        actions = st.receive(resp)
        if st.progress_ok:
            self._progress_supported = True
        if not was_healthy and st.healthy:
            self._down_since = None
            self._errors.clear()
            self._set_connected(True)
        self._apply(s, actions)
        if resp.created:
            self._apply(s, st.next_create(time.monotonic()))

    def _apply(self, s: _Session, actions: list[Action]) -> None:
        """Do what the state machine decided (the only place its decisions meet I/O)."""
        for a in actions:
            if isinstance(a, Create):
                s.state.asked(time.monotonic(), self._last_contact)
                w = a.watch
                req = rpc_pb2.WatchCreateRequest(
                    key=w.key, range_end=w.range_end, start_revision=w.next_rev,
                    progress_notify=not w.probe,
                )
                self._send(s, rpc_pb2.WatchRequest(create_request=req))
            elif isinstance(a, Cancel):
                self._send(
                    s,
                    rpc_pb2.WatchRequest(
                        cancel_request=rpc_pb2.WatchCancelRequest(watch_id=a.server_id)
                    ),
                )
            elif isinstance(a, Deliver):
                assert a.watch.on_events is not None
                try:
                    a.watch.on_events(a.events, a.revision)
                except Exception:
                    log.exception(
                        "etcd watch %r: on_events callback failed at revision %d",
                        a.watch.prefix, a.revision,
                    )
            elif isinstance(a, Forget):
                with self._lock:
                    self._watches.pop(a.watch.wid, None)
            elif isinstance(a, Relisted):
                metrics.WATCH_RELISTS.inc()
                log.info(
                    "etcd watch %r: revision %d compacted (compact revision %d); rereading",
                    a.watch.prefix, a.watch.next_rev, a.compact_revision,
                )
                self._mark_dirty()
            elif isinstance(a, End):
                log.warning("%s; reopening the stream", a.message)
                raise _StreamEnded(a.reason)

    def _send(self, s: _Session, req: rpc_pb2.WatchRequest) -> None:
        s.requests.put(req)

    def _read_next(self, s: _Session) -> None:
        """Reset (read) the next queued watch if it needs it, then queue its create."""
        st = s.state
        w = st.todo.popleft()
        if not w.cancelled and w.need_reset:
            self._reset(w)  # EtcdError propagates: the session ends and is retried
        if w.cancelled:
            self._apply(s, [Forget(w)])
            return
        st.ready.append(w)
        self._apply(s, st.next_create(time.monotonic()))

    def _reset(self, w: WatchState) -> None:
        kvs, rev = self._client.get_prefix(w.prefix)
        w.need_reset = False
        w.next_rev = rev + 1
        w.resets += 1
        if w.cancelled:
            return
        assert w.on_reset is not None
        try:
            w.on_reset(kvs, rev)
        except Exception:
            log.exception("etcd watch %r: on_reset callback failed at revision %d", w.prefix, rev)

    # ------------------------------------------------------------------ logging
    def _note_down(self, endpoint: str, detail: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._down_since_wall = time.time()
        if endpoint:
            self._errors[endpoint] = detail

    def _log_end(self, s: _Session, err: BaseException | None) -> None:
        """Warn when a healthy stream breaks; while no endpoint answers, warn every 30 s with
        the endpoints tried, since when, and the last error of each."""
        if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
            detail = f"{err.code().name}: {err.details()}"
        elif err is None:
            detail = "stream closed by the server"
        else:
            detail = repr(err)
        now = time.monotonic()
        nxt = self._client.endpoints[
            (self._client.endpoints.index(s.endpoint) + 1) % len(self._client.endpoints)
        ] if s.endpoint in self._client.endpoints else s.endpoint
        if s.state.healthy:
            self._note_down(s.endpoint, detail)
            self._down_logged = now
            log.warning(
                "etcd watch stream to %s ended (%s); reopening on %s", s.endpoint, detail, nxt
            )
            return
        first = self._down_since is None
        self._note_down(s.endpoint, detail)
        if first or now - self._down_logged >= _DOWN_LOG_EVERY:
            self._down_logged = now
            assert self._down_since is not None
            tried = "; ".join(f"{ep}: {msg}" for ep, msg in self._errors.items())
            log.warning(
                "etcd watch: no etcd endpoint has answered since %s (%.0fs ago); endpoints "
                "[%s]; last error per endpoint tried: %s; retrying (backoff up to %gs)",
                time.strftime("%H:%M:%S", time.localtime(self._down_since_wall)),
                max(0.0, now - self._down_since), ", ".join(self._client.endpoints), tried,
                _BACKOFF_MAX,
            )
        else:
            log.debug("etcd watch stream to %s failed (%s); retrying", s.endpoint, detail)
