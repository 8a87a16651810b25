"""The resume / re-list state machine of one etcd Watch stream, without I/O (h11-style).

:class:`StreamState` takes what arrives (etcd ``WatchResponse`` messages, the clock) and returns
what to do as values (:class:`Create`, :class:`Cancel`, :class:`Deliver`, :class:`Relisted`,
:class:`End`); it never reads a socket, sleeps, starts a thread or calls a user callback.
:class:`meshlib.discovery.watch.WatchManager` is the driver: it owns the gRPC stream and the
threads, and acts on the returned values. The tables in ``tests/unit/test_watch_state.py`` run
this machine response by response.

Rules (etcd "Watch API" docs; the resume rules follow etcd's ``clientv3`` watcher):

* Per watch, ``next_rev`` = last revision seen + 1. Events below ``next_rev`` are dropped, so a
  resumed stream never duplicates; a per-watch progress notification (no events, that watch's
  id) advances ``next_rev`` to ``header.revision + 1``. The stream-wide answer to a
  ``progress_request`` (``watch_id == -1``) proves liveness only: in etcd < 3.5.8 its revision can
  be ahead of events not yet delivered to unsynced watchers (etcd-io/etcd#15220).
* After any stream failure every watch is re-created from its ``next_rev`` on a new stream. A
  create answered ``canceled`` with ``compact_revision`` means that revision is gone: the watch
  must be re-read whole (``need_reset``) and created again from the read's revision + 1.
* One create is outstanding per stream at a time, as in ``clientv3`` (``watchGrpcStream.run``),
  so a ``created`` answer always belongs to the one pending create. Several outstanding creates
  cannot be paired with answers behind etcd's grpc-proxy, which answers ``created`` out of order
  (docs/scaling.md, "Limits we observed").
* Liveness: every progress interval the driver asks a question the server must answer: a
  ``progress_request`` once the server has answered one (etcd >= 3.4 answers at once), else,
  behind etcd's grpc-proxy, which ignores progress requests, a *probe*: a create of a watch on a
  key meshlib never writes (:data:`PROBE_KEY`), cancelled as soon as it is answered. Every create
  is a question too. :meth:`StreamState.owed_since` is the time of the oldest question that no
  message (by arrival time) has followed; when that is older than the driver's answer limit the
  stream is ended as ``"silent"`` (a SIGSTOPped member or proxy keeps its TCP connection; nothing
  else would notice). Arrival times come from the reader thread, so a driver busy in a long read
  does not mistake its own delay for silence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from etcd3.etcdrpc import rpc_pb2

from .etcd_client import Event, event_from_pb

__all__ = [
    "PROBE_KEY", "WatchState", "StreamState", "Create", "Cancel", "Deliver", "Relisted", "Forget",
    "End",
    "Action", "EndReason",
]

#: Key of the liveness probe watch behind grpc-proxy; meshlib never writes it.
PROBE_KEY = b"/meshlib-watch-liveness-probe"

EndReason = Literal["silent", "refused", "canceled", "reused_id"]


@dataclass(eq=False)
class WatchState:
    """One prefix watch: what it covers and how far it has seen (driver data rides along)."""

    wid: int
    prefix: str
    key: bytes = b""
    range_end: bytes = b""
    next_rev: int = 0
    need_reset: bool = True
    stream: int = 0  # generation of the stream this watch is created on (0: none)
    server_id: int | None = None
    cancelled: bool = False
    resets: int = 0
    probe: bool = False
    on_reset: Callable[..., Any] | None = None  # driver's callbacks; never called from here
    on_events: Callable[..., Any] | None = None


class Create(NamedTuple):
    """Send a ``WatchCreateRequest`` for ``watch`` from ``watch.next_rev`` (0 for the probe)."""

    watch: WatchState


class Cancel(NamedTuple):
    """Send a ``WatchCancelRequest`` for the server's watch id."""

    server_id: int


class Deliver(NamedTuple):
    """Hand ``events`` (all at or above the watch's old ``next_rev``) to the watch."""

    watch: WatchState
    events: list[Event]
    revision: int


class Relisted(NamedTuple):
    """etcd compacted the watch's revision: it is re-read before it is created again."""

    watch: WatchState
    compact_revision: int


class Forget(NamedTuple):
    """A cancelled watch is done with: the driver drops it."""

    watch: WatchState


class End(NamedTuple):
    """End this stream (the driver opens a new one); ``message`` says why, for the log."""

    reason: EndReason
    message: str


Action = Create | Cancel | Deliver | Relisted | Forget | End


@dataclass(eq=False)
class StreamState:
    """What one Watch stream knows: queued, pending and created watches, liveness."""

    gen: int
    opened: float
    healthy: bool = False  # the server has answered at least once
    progress_ok: bool = False  # the server answered a progress_request on this stream
    todo: deque[WatchState] = field(default_factory=deque)  # to read (if need_reset), then create
    ready: deque[WatchState] = field(default_factory=deque)  # read; create not sent yet
    pending: tuple[WatchState, float] | None = None  # the one create sent, and when
    by_server_id: dict[int, WatchState] = field(default_factory=dict)
    probes: int = 0  # probe creates sent
    asked_at: float | None = None  # oldest liveness question not followed by any message

    # ------------------------------------------------------------------ planning
    def plan(self, watches: Iterable[WatchState]) -> list[Action]:
        """Queue the watches that are not on this stream; cancel cancelled ones that are."""
        actions: list[Action] = []
        for w in watches:
            if w.cancelled:
                if w.stream != self.gen:
                    actions.append(Forget(w))
                elif w.server_id is not None:
                    actions.append(Cancel(w.server_id))
                    self.by_server_id.pop(w.server_id, None)
                    actions.append(Forget(w))
                # else queued (forgotten when dequeued) or pending (cancelled once created)
                continue
            if w.stream == self.gen:
                continue
            w.stream = self.gen
            w.server_id = None
            self.todo.append(w)
        return actions

    def next_create(self, now: float) -> list[Action]:
        """The next create to send, unless one is outstanding (cancelled ones are forgotten)."""
        actions: list[Action] = []
        while self.pending is None and self.ready:
            w = self.ready.popleft()
            if w.cancelled:
                actions.append(Forget(w))
                continue
            self.pending = (w, now)
            actions.append(Create(w))
        return actions

    def probe(self, now: float) -> Create | None:
        """Behind a server that ignores progress requests (etcd's grpc-proxy), the liveness
        question of each interval: a create of a watch on :data:`PROBE_KEY`, unless a create is
        already outstanding (which is a question too). Cancelled once answered."""
        if self.progress_ok or not self.healthy or self.pending is not None or self.ready:
            return None
        w = WatchState(wid=0, prefix="", key=PROBE_KEY, probe=True, stream=self.gen)
        self.pending = (w, now)
        self.probes += 1
        return Create(w)

    # ------------------------------------------------------------------ liveness
    def asked(self, now: float, last_heard: float | None) -> None:
        """The driver sent a liveness question (a progress request etcd answers, or a create).

        Keeps the time of the oldest question not yet followed by any message."""
        if self.asked_at is None or (last_heard is not None and last_heard >= self.asked_at):
            self.asked_at = now

    def excuse(self, seconds: float) -> None:
        """The driver's process did not run for ``seconds``: that time does not count against
        the server (its answers could not have been recorded)."""
        if self.asked_at is not None:
            self.asked_at += seconds

    def owed_since(self, last_heard: float | None) -> float | None:
        """Since when an answer is owed on this stream (the oldest question asked after the last
        message, by arrival time), or None when every question has been answered."""
        if self.asked_at is None or (last_heard is not None and last_heard >= self.asked_at):
            return None
        return self.asked_at

    # ------------------------------------------------------------------ responses
    def receive(self, resp: rpc_pb2.WatchResponse) -> list[Action]:
        """Apply one ``WatchResponse``; returns what the driver must do."""
        self.healthy = True
        wid = resp.watch_id
        if wid == -1 and not resp.created and not resp.canceled:
            self.progress_ok = True
        if resp.created:
            return self._created(resp)
        if resp.canceled:
            w = self.by_server_id.pop(wid, None)
            if w is None or w.cancelled:
                return []
            w.stream = 0
            w.server_id = None
            if resp.compact_revision > 0:
                w.need_reset = True
                return [Relisted(w, resp.compact_revision)]
            self.healthy = False  # keep backing off if etcd keeps refusing the watch
            return [End("canceled", f"etcd watch {w.prefix!r} canceled by etcd: "
                                    f"{resp.cancel_reason or 'no reason given'}")]
        w = self.by_server_id.get(wid)
        if w is None or w.cancelled:
            return []  # stream-wide progress answer (watch_id -1), a probe or a cancelled watch
        if not resp.events:
            w.next_rev = max(w.next_rev, resp.header.revision + 1)
            return []
        events = [event_from_pb(e) for e in resp.events if e.kv.mod_revision >= w.next_rev]
        if not events:
            return []
        rev = events[-1].kv.mod_revision
        w.next_rev = rev + 1
        return [Deliver(w, events, rev)]

    def _created(self, resp: rpc_pb2.WatchResponse) -> list[Action]:
        """``created`` answers the one outstanding create."""
        wid = resp.watch_id
        if self.pending is None:
            return []  # nothing outstanding: a stray answer, ignore it
        w = self.pending[0]
        self.pending = None
        if w.probe:
            return [] if resp.canceled else [Cancel(wid)]
        if resp.canceled:  # etcd refused the create (permission denied, invalid range)
            w.stream = 0
            if w.cancelled:
                return [Forget(w)]
            self.healthy = False
            return [End("refused", f"etcd watch {w.prefix!r}: create refused by etcd (watch id "
                                   f"{wid}): {resp.cancel_reason or 'no reason given'}")]
        other = self.by_server_id.get(wid)
        if other is not None:
            return [End("reused_id", f"etcd watch {w.prefix!r}: etcd reused watch id {wid} of "
                                     f"{other.prefix!r} on one stream")]
        if w.cancelled:  # cancelled while its create was outstanding
            return [Cancel(wid), Forget(w)]
        w.server_id = wid
        self.by_server_id[wid] = w
        return []
