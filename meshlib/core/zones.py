"""Zone preference: keep traffic in the caller's zone while enough of it is usable.

Locality failover as Istio and Envoy's zone-aware routing do it: when at least
``min_zone_healthy_percent`` % of the caller's-zone candidates are usable (not ejected, no open
breaker, not held out by a failed health check: ``HealthSlot.blocked_until``), only they are
candidates; otherwise all are. The local share of each candidate tuple is computed once.
"""

from __future__ import annotations

from typing import Any

from meshlib.core.endpoints import Endpoint, endpoint_key

__all__ = ["ZoneFilter"]


class ZoneFilter:
    """Prefer the caller's zone while enough of it is usable.

    ``select(candidates)`` returns the local-zone share of ``candidates`` (a tuple computed
    once per candidate tuple) when at least ``min_zone_healthy_percent`` % of it is usable
    and at least one is, else ``candidates``.
    """

    _MAX_CACHE = 64

    def __init__(
        self,
        local_zone: str | None,
        min_zone_healthy_percent: float,
        health: Any | None = None,
        *,
        enabled: bool = True,
    ) -> None:
        self.local_zone = local_zone
        self.min_percent = min_zone_healthy_percent
        self.health = health
        self.enabled = enabled and local_zone is not None
        self._cache: dict[int, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...], Any]] = {}

    def _local(self, candidates: tuple[Endpoint, ...]) -> tuple[tuple[Endpoint, ...], Any]:
        hit = self._cache.get(id(candidates))
        if hit is not None and hit[0] is candidates:
            return hit[1], hit[2]
        local = tuple(e for e in candidates if e.zone == self.local_zone)
        slots = (
            None if self.health is None
            else tuple(self.health.slot(endpoint_key(e)) for e in local)
        )
        if len(self._cache) >= self._MAX_CACHE:
            self._cache.clear()
        self._cache[id(candidates)] = (candidates, local, slots)
        return local, slots

    def select(
        self, candidates: tuple[Endpoint, ...], now: float = 0.0
    ) -> tuple[Endpoint, ...]:
        if not self.enabled or not candidates:
            return candidates
        local, slots = self._local(candidates)
        if not local or len(local) == len(candidates):
            return candidates
        if slots is None:
            healthy = len(local)
        else:
            healthy = 0
            for s in slots:
                if s.blocked_until <= now:
                    healthy += 1
        if healthy and healthy * 100 >= self.min_percent * len(local):
            return local
        return candidates
