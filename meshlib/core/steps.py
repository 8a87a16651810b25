"""Steps shared by the plain (:mod:`meshlib.core.call`) and hedged (:mod:`meshlib.core.hedged`)
attempt loops: choosing the endpoint of an attempt and passing health events on."""

from __future__ import annotations

from typing import Any

from meshlib.core.actions import BLOCKED, CallObserver
from meshlib.core.destination import DestinationState, Plan
from meshlib.core.health import ADMIT, CLOSED, REJECT, HealthEvent, HealthRegistry

EMPTY: frozenset[str] = frozenset()


def report(dest: DestinationState, observer: CallObserver,
           events: tuple[HealthEvent, ...]) -> None:
    """Health events a call caused: to the call's observer (telemetry) and the destination's
    pybreaker listeners."""
    if events:
        observer.health(events)
        dest.on_health(events)


def fallback_pick(balancer: Any, candidates: tuple[Any, ...], candidates_all: tuple[Any, ...],
                  tried: set[str] | frozenset[str], hash_key: str | None, t: float) -> Any:
    """When the first pick found nothing: an untried endpoint in another zone beats
    retrying a failed local one; then reusing a tried endpoint beats failing."""
    ep = None
    if candidates is not candidates_all:
        ep = balancer.pick(candidates_all, tried, hash_key, t)
    if ep is None and tried:
        ep = balancer.pick(candidates, EMPTY, hash_key, t)
    if ep is None and candidates is not candidates_all:
        ep = balancer.pick(candidates_all, EMPTY, hash_key, t)
    return ep


def choose(plan: Plan, health: HealthRegistry, candidates_all: tuple[Any, ...],
           tried: set[str] | frozenset[str], hash_key: str | None, t: float) -> tuple[Any, int]:
    """The endpoint of the next attempt and the breaker's admission for it.

    Zone filter, then the balancer (skipping ``tried`` and unusable endpoints), then
    :func:`fallback_pick`, then ``HealthRegistry.admit``. Returns ``(endpoint, admission)``;
    ``(None, BLOCKED)`` when no endpoint is usable; ``(None, REJECT)`` when breakers refused
    ``len(candidates_all) + 1`` picks in a row (a refusal blocks that endpoint, so the next
    pick goes elsewhere: the bound only ends a loop of breakers flipping under concurrency).
    """
    candidates = plan.zones.select(candidates_all, t) if plan.zoned else candidates_all
    return choose_after(plan, health, candidates_all, tried, hash_key, t,
                        plan.balancer.pick(candidates, tried, hash_key, t), candidates)


def choose_after(plan: Plan, health: HealthRegistry, candidates_all: tuple[Any, ...],
                 tried: set[str] | frozenset[str], hash_key: str | None, t: float,
                 ep: Any, candidates: tuple[Any, ...]) -> tuple[Any, int]:
    """:func:`choose` after its first ``balancer.pick`` (``ep``, from ``candidates``).

    ``run_call`` makes that first pick itself (shortcut S4, docs/design.md 9) and calls
    this when the pick is not an endpoint with a closed breaker; ``choose`` is exactly the
    first pick followed by this function."""
    balancer = plan.balancer
    refused = 0
    while True:
        if ep is None:
            ep = fallback_pick(balancer, candidates, candidates_all, tried, hash_key, t)
            if ep is None:
                return None, BLOCKED
        # Shortcut S1 (docs/design.md 9): a closed breaker admits (HealthRegistry.admit's
        # first test, also true with breakers off: configure() closes them); held to
        # ``admit`` by test_core_call_differential.py.
        hs = health.slots.get(ep.key)
        if hs is not None and hs.state is CLOSED:
            return ep, ADMIT
        admission = health.admit(ep, t)
        if admission != REJECT:
            return ep, admission
        refused += 1
        if refused > len(candidates_all):
            return None, REJECT
        candidates = plan.zones.select(candidates_all, t) if plan.zoned else candidates_all
        ep = balancer.pick(candidates, tried, hash_key, t)
