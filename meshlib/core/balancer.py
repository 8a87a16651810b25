"""Load balancers: pick one endpoint for an attempt.

A balancer is built once per snapshot (per policy/endpoint-set change) and picks from
candidate tuples that were themselves computed once (the snapshot's endpoints, a route's
subset, the local-zone share of it). For each distinct candidate tuple it precomputes, on
first use, a group: keys, weights, cumulative weights, per-endpoint load and health slots,
and the algorithm's schedule (EDF heap, hash ring). A pick then does no dict lookups and
allocates almost nothing.

Per-endpoint load (in-flight count, peak-EWMA latency) lives in
:class:`~meshlib.core.load.LoadStats` (:mod:`meshlib.core.load`), zone preference in
:class:`~meshlib.core.zones.ZoneFilter` (:mod:`meshlib.core.zones`); both are re-exported here. Health (breaker
open, ejected) is read from the optional health registry's slots (``blocked_until``, see
:mod:`meshlib.core.health`): unusable endpoints are skipped like excluded ones.

Algorithms (``load_balancer.policy``):

* ``round_robin``: weighted round robin by earliest deadline first, Envoy's
  ``EdfScheduler``: each endpoint's next deadline advances by ``1/weight`` when picked, so
  picks are exactly proportional to weights and interleaved. The start is rotated by a random
  offset so that many clients do not all begin with the same endpoint (Envoy does the same).
* ``random``: weighted random, one draw and a bisect on cumulative weights.
* ``least_request``: Envoy's default. With equal weights, power of two choices (P2C; Mitzenmacher;
  Envoy ``choice_count`` 2): draw two distinct endpoints, take the one with fewer requests in
  flight. With unequal weights, Envoy's weighted form: EDF where an endpoint's effective
  weight is ``weight / (active_requests + 1) ** active_request_bias`` (bias 1.0), recomputed
  each time it is scheduled (``load_balancer.active_request_bias``).
* ``peak_ewma``: Linkerd/Finagle (``finagle-core`` ``PeakEwma``, Linkerd's balancer). P2C
  over ``cost = rtt_estimate * (in_flight + 1)``. The estimate starts at ``default_rtt``; a
  sample above it replaces it at once (peak sensitivity), a sample below is averaged in with
  weight ``1 - exp(-elapsed / decay)``; when read, the estimate decays toward zero with the
  time since its last sample (Finagle), so an endpoint that had one slow answer is probed
  again later. A failed attempt cannot lower the estimate (fast failures must not attract
  traffic). P2C draws are weighted by endpoint weight.
* ``ring_hash``: Ketama-style consistent hashing (Envoy ``ring_hash``). Each endpoint gets
  ``ceil(weight * scale)`` points on a 64-bit ring, point ``j`` at
  ``blake2b(f"{key}#{j}", digest_size=8)`` (xxhash is not a dependency); ``scale`` is the
  power of two that makes the ring hold at least ``ring_size`` points. A key maps to the
  first point at or after its hash. An endpoint's points depend only on its own key and
  weight and on the power-of-two scale, so removing an endpoint moves only its own keys
  (to the next points clockwise) and no key moves between survivors, unless the total weight
  crosses a power of two, when the scale changes and a fraction of keys move as with Envoy's
  proportional rings. If the owner is excluded or unusable, the walk continues clockwise to
  the next allowed endpoint. No hash key: a random point (Envoy).

Endpoint weights below 1 count as 1 (Envoy's minimum weight is 1).

Zone preference (:class:`ZoneFilter`): when at least ``min_zone_healthy_percent`` % of the
caller's-zone candidates are usable, only they are candidates; otherwise all are (locality
failover, as Istio and Envoy's zone-aware routing do).

``exclude`` is a set of endpoint keys not to pick (for retries: those already tried, so the
next attempt goes to another instance when one exists; when everything is excluded
``pick`` returns ``None`` and the driver may pick again without ``exclude``). Thread
safety: counters use ``+=`` under the GIL (a lost race costs accuracy only); EDF heaps are
guarded by a lock held for a few list operations.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from typing import Any

from meshlib.core.endpoints import Endpoint, endpoint_key
from meshlib.core.load import LoadSlot, LoadStats
from meshlib.core.zones import ZoneFilter

__all__ = [
    "EMPTY",
    "Balancer",
    "LeastRequest",
    "LoadSlot",
    "LoadStats",
    "PeakEwma",
    "RandomBalancer",
    "RingHash",
    "RoundRobin",
    "ZoneFilter",
    "endpoint_key",
    "hash_key_source",
    "hash64",
    "make_balancer",
]

EMPTY: frozenset[str] = frozenset()


def hash64(data: str | bytes) -> int:
    """Stable 64-bit hash (blake2b, 8-byte digest) used for the hash ring."""
    if isinstance(data, str):
        data = data.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# --------------------------------------------------------------------------- groups


class _Group:
    """Everything precomputed about one candidate tuple."""

    __slots__ = ("eps", "keys", "weights", "cum", "total", "loads", "healths", "n", "equal",
                 "state", "lock")

    def __init__(
        self, eps: tuple[Endpoint, ...], stats: LoadStats, health: Any | None
    ) -> None:
        self.eps = eps
        self.keys = tuple(endpoint_key(e) for e in eps)
        self.weights = tuple(max(1, int(e.weight)) for e in eps)
        cum: list[int] = []
        acc = 0
        for w in self.weights:
            acc += w
            cum.append(acc)
        self.cum = tuple(cum)
        self.total = acc
        self.loads = tuple(stats.slot(k) for k in self.keys)
        self.healths = None if health is None else tuple(health.slot(k) for k in self.keys)
        self.n = len(eps)
        self.equal = len(set(self.weights)) <= 1
        self.state: Any = None
        self.lock = threading.Lock()


def _ok(g: _Group, i: int, exclude: frozenset[str] | set[str], t: float) -> bool:
    if exclude and g.keys[i] in exclude:
        return False
    hs = g.healths
    return hs is None or hs[i].blocked_until <= t


def _allowed(g: _Group, exclude: frozenset[str] | set[str], t: float) -> list[int]:
    return [i for i in range(g.n) if _ok(g, i, exclude, t)]


# --------------------------------------------------------------------------- base


class Balancer:
    """Base class: group cache and the ``pick`` entry point."""

    name = "base"
    _MAX_GROUPS = 64

    def __init__(
        self,
        stats: LoadStats,
        *,
        rng: random.Random,
        now: Callable[[], float],
        health: Any | None = None,
    ) -> None:
        self.stats = stats
        self.health = health
        self._rng = rng
        self._now = now
        self._groups: dict[int, _Group] = {}
        self._last = _Group((), stats, health)

    def group(self, candidates: tuple[Endpoint, ...]) -> _Group:
        g = self._groups.get(id(candidates))
        if g is None or g.eps is not candidates:
            g = _Group(tuple(candidates), self.stats, self.health)
            self._init_group(g)
            if len(self._groups) >= self._MAX_GROUPS:
                self._groups.clear()  # candidates were not precomputed tuples; stay bounded
            self._groups[id(candidates)] = g
            g.eps = candidates  # keep the caller's object alive so its id stays unique
        return g

    def pick(
        self,
        candidates: tuple[Endpoint, ...],
        exclude: frozenset[str] | set[str] = EMPTY,
        hash_key: str | bytes | None = None,
        now: float | None = None,
    ) -> Endpoint | None:
        """One endpoint of ``candidates`` that is not in ``exclude`` and is usable, or
        ``None``. ``hash_key`` matters to ``ring_hash`` only."""
        g = self._last  # the group of the previous pick: usually the same candidates
        if g.eps is not candidates:
            g = self.group(candidates)
            self._last = g
        n = g.n
        if n < 2:  # nothing to balance (Envoy skips the LB for a single host too)
            if n == 0 or not _ok(g, 0, exclude, self._now() if now is None else now):
                return None
            return g.eps[0]
        t = self._now() if now is None else now
        i = self._pick(g, exclude, hash_key, t)
        return None if i is None else g.eps[i]

    def _init_group(self, g: _Group) -> None:
        pass

    def _pick(
        self, g: _Group, exclude: frozenset[str] | set[str], hash_key: Any, t: float
    ) -> int | None:
        raise NotImplementedError

    # ---- shared drawing helpers

    def _draw(self, g: _Group) -> int:
        if g.equal:
            return self._rng.randrange(g.n)
        i = bisect_right(g.cum, self._rng.random() * g.total)
        return i if i < g.n else g.n - 1

    def _draw_from(self, g: _Group, idxs: Sequence[int]) -> int:
        if g.equal or len(idxs) == 1:
            return idxs[self._rng.randrange(len(idxs))]
        total = sum(g.weights[i] for i in idxs)
        r = self._rng.random() * total
        for i in idxs:
            r -= g.weights[i]
            if r < 0:
                return i
        return idxs[-1]

    def _draw_allowed(
        self, g: _Group, exclude: frozenset[str] | set[str], t: float, tries: int = 3
    ) -> int | None:
        for _ in range(tries):
            i = self._draw(g)
            if _ok(g, i, exclude, t):
                return i
        allowed = _allowed(g, exclude, t)
        return self._draw_from(g, allowed) if allowed else None

    def _two(
        self, g: _Group, exclude: frozenset[str] | set[str], t: float
    ) -> tuple[int, int] | int | None:
        """Two candidates for P2C (distinct when weights are equal), or one, or none."""
        if g.n == 1:
            return 0 if _ok(g, 0, exclude, t) else None
        if g.equal:
            a = self._rng.randrange(g.n)
            b = self._rng.randrange(g.n - 1)
            if b >= a:
                b += 1
            ok_a = _ok(g, a, exclude, t)
            ok_b = _ok(g, b, exclude, t)
            if ok_a and ok_b:
                return a, b
        else:
            a = self._draw(g)
            b = self._draw(g)
            if _ok(g, a, exclude, t) and _ok(g, b, exclude, t):
                return a, b
        allowed = _allowed(g, exclude, t)
        if not allowed:
            return None
        if len(allowed) == 1:
            return allowed[0]
        a = self._draw_from(g, allowed)
        if g.equal:
            rest = [i for i in allowed if i != a]
            return a, rest[self._rng.randrange(len(rest))]
        return a, self._draw_from(g, allowed)


# --------------------------------------------------------------------------- algorithms


class RandomBalancer(Balancer):
    """Weighted random."""

    name = "random"

    def _pick(self, g: _Group, exclude: Any, hash_key: Any, t: float) -> int | None:
        return self._draw_allowed(g, exclude, t)


class _Edf(Balancer):
    """Earliest deadline first over ``1/effective_weight`` (Envoy ``EdfScheduler``)."""

    def _init_group(self, g: _Group) -> None:
        off = self._rng.randrange(g.n) if g.n else 0
        heap = [(1.0 / w, (i - off) % g.n, i) for i, w in enumerate(g.weights)]
        heapq.heapify(heap)
        g.state = heap

    def _step(self, g: _Group, i: int) -> float:
        return 1.0 / g.weights[i]

    def _pick(self, g: _Group, exclude: Any, hash_key: Any, t: float) -> int | None:
        heap = g.state
        skipped: list[tuple[float, int, int]] | None = None
        found: int | None = None
        with g.lock:
            while heap:
                entry = heapq.heappop(heap)
                i = entry[2]
                if _ok(g, i, exclude, t):
                    heapq.heappush(heap, (entry[0] + self._step(g, i), entry[1], i))
                    found = i
                    break
                if skipped is None:
                    skipped = []
                skipped.append(entry)
            if skipped:
                for e in skipped:
                    heapq.heappush(heap, e)
        return found


class RoundRobin(_Edf):
    """Weighted round robin (static-weight EDF; plain rotation when weights are equal)."""

    name = "round_robin"


class LeastRequest(_Edf):
    """Envoy least_request: P2C on in-flight (equal weights) or dynamic-weight EDF."""

    name = "least_request"

    def __init__(self, *args: Any, active_request_bias: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bias = active_request_bias

    def _step(self, g: _Group, i: int) -> float:
        a = g.loads[i].in_flight + 1
        if self.bias == 1.0:
            return a / g.weights[i]
        return a**self.bias / g.weights[i]

    def _pick(self, g: _Group, exclude: Any, hash_key: Any, t: float) -> int | None:
        if not g.equal:
            return super()._pick(g, exclude, hash_key, t)
        two = self._two(g, exclude, t)
        if two is None or isinstance(two, int):
            return two
        a, b = two
        loads = g.loads
        return b if loads[b].in_flight < loads[a].in_flight else a


class PeakEwma(Balancer):
    """Linkerd/Finagle P2C over peak-EWMA cost."""

    name = "peak_ewma"

    def _pick(self, g: _Group, exclude: Any, hash_key: Any, t: float) -> int | None:
        two = self._two(g, exclude, t)
        if two is None or isinstance(two, int):
            return two
        a, b = two
        cost = self.stats.cost
        return b if cost(g.loads[b], t) < cost(g.loads[a], t) else a


class RingHash(Balancer):
    """Ketama-style consistent hash ring."""

    name = "ring_hash"

    def __init__(self, *args: Any, ring_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ring_size = ring_size

    def scale(self, total_weight: int) -> float:
        """Points per unit of weight: the power of two making the ring >= ring_size."""
        return 2.0 ** math.ceil(math.log2(self.ring_size / total_weight))

    def _init_group(self, g: _Group) -> None:
        if not g.n:
            g.state = ((), ())
            return
        s = self.scale(g.total)
        points: list[tuple[int, int]] = []
        for i, (key, w) in enumerate(zip(g.keys, g.weights, strict=True)):
            count = max(1, math.ceil(w * s - 1e-9))
            for j in range(count):
                points.append((hash64(f"{key}#{j}"), i))
        points.sort()
        g.state = (tuple(p[0] for p in points), tuple(p[1] for p in points))

    def _pick(self, g: _Group, exclude: Any, hash_key: Any, t: float) -> int | None:
        hashes, owners = g.state
        size = len(hashes)
        h = self._rng.getrandbits(64) if hash_key is None else hash64(hash_key)
        pos = bisect_left(hashes, h)
        if pos == size:
            pos = 0
        i = owners[pos]
        if _ok(g, i, exclude, t):
            return i
        for step in range(1, size):
            i = owners[(pos + step) % size]
            if _ok(g, i, exclude, t):
                return i
        return None


# --------------------------------------------------------------------------- factory

_ALGORITHMS: dict[str, type[Balancer]] = {
    "round_robin": RoundRobin,
    "random": RandomBalancer,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwma,
    "ring_hash": RingHash,
}


def make_balancer(
    lb: Any,
    stats: LoadStats,
    *,
    rng: random.Random,
    now: Callable[[], float],
    health: Any | None = None,
) -> Balancer:
    """The balancer for ``policy.load_balancer`` (``policy``, ``ring_size``, ...)."""
    name = lb.policy
    cls = _ALGORITHMS.get(name)
    if cls is None:
        raise ValueError(
            f"load_balancer.policy: unknown algorithm {name!r} "
            f"(known: {', '.join(sorted(_ALGORITHMS))})"
        )
    if cls is RingHash:
        return RingHash(stats, rng=rng, now=now, health=health,
                        ring_size=int(lb.ring_size))
    if cls is LeastRequest:
        return LeastRequest(stats, rng=rng, now=now, health=health,
                            active_request_bias=float(lb.active_request_bias))
    return cls(stats, rng=rng, now=now, health=health)


def hash_key_source(lb: Any) -> tuple[str, str] | None:
    """``("header", name)`` or ``("cookie", name)`` from ``load_balancer.hash_on``, or ``None``;
    the driver reads that header or cookie and passes it as ``hash_key``."""
    h = getattr(lb, "hash_on", None)
    if h is None:
        return None
    if getattr(h, "header", None):
        return "header", h.header.lower()
    if getattr(h, "cookie", None):
        return "cookie", h.cookie
    return None
