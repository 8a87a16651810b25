"""Per-destination state shared by every driver (httpx, gRPC, shim).

One :class:`DestinationState` per destination service per ``Mesh``. It holds what must
outlive a snapshot (per-endpoint load and health, the retry budget, the in-flight count)
and a :class:`Plan`: every policy object compiled once from one ``ServiceSnapshot``
(balancer, router, zone filter, retry policy, fault injector, limits). The call path
compares the current snapshot object with the plan's by identity and recompiles only when
etcd delivered a new one, so no policy object is built per call (Finagle's Stack params /
Envoy's cluster config: built when config changes, read per request).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import repeat
from typing import Any, Protocol

from meshlib.core.balancer import Balancer, LoadStats, ZoneFilter, hash_key_source, make_balancer
from meshlib.core.breaker_mirror import pybreaker_mirror
from meshlib.core.budget import RetryBudget
from meshlib.core.endpoints import ServiceSnapshot
from meshlib.core.health import (
    EventKind,
    HealthEvent,
    HealthRegistry,
)
from meshlib.core.retry import RetryPolicy
from meshlib.core.routing import FaultInjector, Router

log = logging.getLogger("meshlib.core.destination")

_BREAKER_EVENTS = {
    EventKind.BREAKER_OPENED: "open",
    EventKind.BREAKER_HALF_OPEN: "half-open",
    EventKind.BREAKER_CLOSED: "closed",
}


class DiscoveryState(Protocol):
    """What the call plan may ask of discovery: is etcd reachable, and since when not
    (``meshlib.discovery.watch.WatchManager`` has exactly these two properties)."""

    @property
    def connected(self) -> bool: ...

    @property
    def last_contact(self) -> float | None: ...


class _StateName:
    """What pybreaker listeners read of a state: its ``name`` (pybreaker's state names)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class Plan:
    """Everything compiled from one snapshot. Read-only after construction."""

    __slots__ = (
        "snapshot", "policy", "balancer", "router", "zones", "retry", "faults",
        "max_requests", "hash_source", "has_header_routes", "endpoint_count", "zoned",
        "hedging", "faults_active",
    )

    def __init__(self, dest: DestinationState, snap: ServiceSnapshot) -> None:
        policy = snap.policy
        self.snapshot = snap
        self.policy = policy
        keys = [e.key for e in snap.endpoints]
        dest.stats.configure(policy.load_balancer.ewma.default_rtt, policy.load_balancer.ewma.decay)
        dest.stats.track_latency = policy.load_balancer.policy == "peak_ewma"
        dest.stats.prune(keys)
        dest.health.prune(keys)
        events = dest.health.configure(policy.circuit_breaker, policy.outlier_detection)
        if events:  # the new policy ended an open breaker or an ejection
            dest.health_changed(events)
        self.balancer: Balancer = make_balancer(
            policy.load_balancer, dest.stats, rng=dest.rng, now=dest.now, health=dest.health
        )
        self.router = Router(policy.subsets, policy.routes, snap.endpoints)
        self.zones = ZoneFilter(
            dest.zone,
            policy.load_balancer.min_zone_healthy_percent,
            dest.health,
            enabled=policy.load_balancer.zone_aware,
        )
        self.retry = RetryPolicy.from_policy(
            policy, now=dest.now, rng=dest.rng, budget=dest.budget_for(policy.retries.budget)
        )
        self.faults = FaultInjector(policy.fault)
        self.faults_active = self.faults.active
        self.max_requests = int(policy.concurrency.max_requests)
        dest.set_limit(self.max_requests)
        self.hash_source = (
            hash_key_source(policy.load_balancer)
            if policy.load_balancer.policy == "ring_hash"
            else None
        )
        self.has_header_routes = bool(policy.routes)
        self.endpoint_count = len(snap.endpoints)
        self.zoned = self.zones.enabled  # False: skip the zone filter on the call path
        self.hedging = bool(self.retry.hedging.enabled)


class DestinationState:
    """State of one destination service, shared by all drivers of one ``Mesh``."""

    def __init__(
        self,
        service: str,
        snapshot: Callable[[], ServiceSnapshot],
        *,
        lookup: Callable[[str], ServiceSnapshot | None] | None = None,
        zone: str | None = None,
        now: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self._snapshot = snapshot
        # ``lookup(service)`` (a C-level ``dict.get`` of the snapshot store, Mesh): the call
        # path reads the published snapshot with no Python frame; ``snapshot()`` is asked only
        # when it has none (not watched yet).
        self.lookup = lookup
        self.zone = zone
        self.now = now
        self.rng = rng or random.Random()
        self.stats = LoadStats(now)
        self.health = HealthRegistry(None, None, now)
        self._budget: RetryBudget | None = None
        self._budget_cfg: Any = None
        self.current: Plan | None = None
        self.tokens: deque[None] = deque()
        self._limit = 0
        self.debt = 0
        self._limit_lock = threading.Lock()
        #: pybreaker listeners told of every breaker transition (``Mesh(breaker_listeners=)``)
        self.breaker_listeners: list[Any] = []
        self.breakers: dict[str, Any] = {}
        self._breaker_states: dict[str, str] = {}
        #: told of health events no call caused (a policy change closing a breaker or
        #: ending an ejection): the destination's telemetry recorder (a ``CallObserver``)
        self.observer: Any = None
        #: discovery's connection state, for error messages (``Mesh`` sets its etcd watch):
        #: ``connected`` (bool) and ``last_contact`` (this clock's time of etcd's last
        #: answer, None before the first), or None when unknown
        self.discovery: DiscoveryState | None = None

    def health_changed(self, events: tuple[HealthEvent, ...]) -> None:
        """Health events that happened outside a call: to :attr:`observer` and listeners."""
        if self.observer is not None:
            self.observer.health(events)
        self.on_health(events)

    def on_health(self, events: tuple[HealthEvent, ...]) -> None:
        """Tell pybreaker listeners of breaker transitions (``Mesh(breaker_listeners=)``).

        Each endpoint gets a ``pybreaker.CircuitBreaker`` mirror whose storage reads our
        state (:func:`meshlib.core.breaker_mirror.pybreaker_mirror`); every transition event is
        passed to each listener's ``state_change(breaker, old, new)`` in order, so a
        half-open trial that closes the breaker is heard as two transitions. Rare
        (transitions only) and skipped without listeners.

        A listener is the user's code: one that raises is logged (with the traceback) and
        skipped, and the call that caused the transition goes on; the other listeners
        still hear it."""
        if not self.breaker_listeners:
            return
        for ev in events:
            new = _BREAKER_EVENTS.get(ev.kind)
            if new is None:
                continue
            pb = self.breakers.get(ev.key)
            if pb is None:
                pb = self.breakers[ev.key] = pybreaker_mirror(
                    self.health, ev.key, name=f"{self.service} {ev.key}"
                )
            old = self._breaker_states.get(ev.key, "closed")
            self._breaker_states[ev.key] = new
            for listener in self.breaker_listeners:
                try:
                    listener.state_change(pb, _StateName(old), _StateName(new))
                except Exception:
                    log.exception("service %r: breaker listener %r failed on %s -> %s of "
                                  "endpoint %s (ignored; the call goes on)",
                                  self.service, listener, old, new, ev.key)

    def budget_for(self, cfg: Any) -> RetryBudget:
        """The destination's retry budget, kept across policy changes unless its settings change."""
        if self._budget is None or cfg != self._budget_cfg:
            self._budget = RetryBudget.from_policy(cfg, self.now)
            self._budget_cfg = cfg
        return self._budget

    def plan(self) -> Plan:
        """The plan for the current snapshot: THE plan lookup of every driver (HTTP, gRPC,
        the shim), called once per logical call.

        Fast path: one C-level ``lookup(service)`` and one identity comparison with the plan
        compiled last; anything else (no plan yet, a new snapshot, no ``lookup``) goes to
        :meth:`_replan`, which compiles a new :class:`Plan`. Drivers must not restate this
        test: a copy would miss the next change to it."""
        plan = self.current
        lookup = self.lookup
        if plan is not None and lookup is not None and plan.snapshot is lookup(self.service):
            return plan
        return self._replan()

    def _replan(self) -> Plan:
        """Recompile the plan when the published snapshot is not the plan's."""
        lookup = self.lookup
        snap = lookup(self.service) if lookup is not None else None
        if snap is None:
            snap = self._snapshot()
        plan = self.current
        if plan is None or plan.snapshot is not snap:
            plan = self.current = Plan(self, snap)
        return plan

    # --- concurrency limit (Envoy max_requests) ------------------------------------------
    # A deque of tokens, one per free slot: ``pop``/``append`` are atomic, so the call path
    # takes no lock. ``set_limit`` (on a policy change) adds or removes tokens; slots it cannot
    # remove because they are in use become debt, paid back by the next releases.
    def set_limit(self, limit: int) -> None:
        with self._limit_lock:
            diff = limit - self._limit
            self._limit = limit
            while diff > 0 and self.debt > 0:
                self.debt -= 1
                diff -= 1
            if diff > 0:
                self.tokens.extend(repeat(None, diff))
            while diff < 0:
                try:
                    self.tokens.pop()
                except IndexError:
                    self.debt -= diff  # the rest are in use: owed by their releases
                    break
                diff += 1

    def acquire(self) -> bool:
        try:
            self.tokens.pop()
        except IndexError:
            return False
        return True

    def release(self) -> None:
        if self.debt:
            with self._limit_lock:
                if self.debt:
                    self.debt -= 1
                    return
        self.tokens.append(None)

    @property
    def inflight(self) -> int:
        """Calls holding a slot right now."""
        with self._limit_lock:
            return self._limit - len(self.tokens) + self.debt
