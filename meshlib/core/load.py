"""Per-endpoint load: requests in flight and the peak-EWMA latency estimate.

:class:`LoadStats` is keyed by ``Endpoint.key`` and shared by every balancer of a destination
and across snapshots, so load survives a snapshot swap; call :meth:`LoadStats.prune` with the
new key set to forget endpoints that left. ``least_request`` reads ``in_flight``,
``peak_ewma`` reads :meth:`LoadStats.cost`.

Peak EWMA (Linkerd's balancer, Finagle ``finagle-core`` ``PeakEwma``): the estimate starts at
``default_rtt``; a sample above it replaces it at once (peak sensitivity), a sample below is
averaged in with weight ``1 - exp(-elapsed / decay)``; when read, the estimate decays toward
zero with the time since its last sample, so an endpoint that had one slow answer is probed
again later. A failed attempt cannot lower the estimate (fast failures must not attract
traffic). Thread safety: ``+=`` under the GIL (a lost race costs accuracy only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from meshlib.core.endpoints import Endpoint, endpoint_key

__all__ = ["LoadSlot", "LoadStats"]


class LoadSlot:
    """Load state of one endpoint: requests in flight and the peak-EWMA RTT estimate."""

    __slots__ = ("key", "in_flight", "ewma", "stamp")

    def __init__(self, key: str, ewma: float, stamp: float) -> None:
        self.key = key
        self.in_flight = 0
        self.ewma = ewma
        self.stamp = stamp

    def __repr__(self) -> str:
        return f"LoadSlot({self.key!r}, in_flight={self.in_flight}, ewma={self.ewma:.6f})"


class LoadStats:
    """Per-endpoint load, keyed by endpoint key, shared by every balancer of a service.

    Call side::

        start = stats.start(ep)            # in_flight += 1, returns the start time
        ...                                # the attempt
        stats.finish(ep, start, now(), ok)  # in_flight -= 1, RTT sample
    """

    def __init__(
        self, now: Callable[[], float], default_rtt: float = 0.03, decay: float = 10.0
    ) -> None:
        self._now = now
        self._slots: dict[str, LoadSlot] = {}
        #: endpoint key -> slot (read-only for callers: the call plan's inlined fast path)
        self.slots = self._slots
        self.default_rtt = default_rtt
        self.decay = decay
        #: RTT samples feed the peak-EWMA estimate; only ``peak_ewma`` reads it, so the
        #: destination turns sampling off for the other balancers (no per-call exp()).
        self.track_latency = True

    def configure(self, default_rtt: float, decay: float) -> None:
        """Apply new ``load_balancer.ewma`` settings (existing estimates are kept)."""
        self.default_rtt = default_rtt
        self.decay = decay

    def slot(self, key: str) -> LoadSlot:
        """The slot for ``key``, created on first use."""
        s = self._slots.get(key)
        if s is None:
            s = self._slots.setdefault(key, LoadSlot(key, self.default_rtt, self._now()))
        return s

    def get(self, key: str) -> LoadSlot | None:
        return self._slots.get(key)

    def keys(self) -> frozenset[str]:
        return frozenset(self._slots)

    def prune(self, alive: Iterable[str]) -> list[str]:
        """Forget endpoints whose key is not in ``alive``; returns the removed keys."""
        keep = set(alive)
        gone = [k for k in list(self._slots) if k not in keep]
        for k in gone:
            self._slots.pop(k, None)
        return gone

    def start(self, ep: Endpoint, now: float | None = None) -> float:
        """An attempt to ``ep`` starts (at ``now``, read from the clock when not given):
        returns its start time for :meth:`finish`."""
        key = ep.key or endpoint_key(ep)
        s = self._slots.get(key)
        if s is None:
            s = self.slot(key)
        s.in_flight += 1
        return self._now() if now is None else now

    def finish(self, ep: Endpoint, start: float, now: float, ok: bool) -> None:
        """An attempt to ``ep`` ended at ``now``: one fewer in flight, and (when a latency
        aware balancer is in use, ``track_latency``) an RTT sample."""
        s = self._slots.get(ep.key or endpoint_key(ep))
        if s is None:
            return  # pruned while the attempt was in flight
        if s.in_flight > 0:
            s.in_flight -= 1
        if self.track_latency:
            self.observe(s, now - start, now, ok)

    def observe(self, s: LoadSlot, rtt: float, now: float, ok: bool = True) -> None:
        """Peak-EWMA update (Finagle ``PeakEwma``, Linkerd)."""
        if rtt < 0:
            rtt = 0.0
        prev = s.ewma
        if not ok and rtt < prev:
            rtt = prev  # a fast failure must not make the endpoint look fast
        if rtt > prev:
            s.ewma = rtt
        else:
            elapsed = now - s.stamp
            w = math.exp(-elapsed / self.decay) if elapsed > 0 else 1.0
            s.ewma = prev * w + rtt * (1.0 - w)
        s.stamp = now

    def cost(self, s: LoadSlot, now: float) -> float:
        """Peak-EWMA cost: the estimate decayed by time since its last sample, times
        ``in_flight + 1``."""
        elapsed = now - s.stamp
        est = s.ewma * math.exp(-elapsed / self.decay) if elapsed > 0 else s.ewma
        return est * (s.in_flight + 1)
