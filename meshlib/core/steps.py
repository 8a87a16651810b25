"""Steps shared by the plain (:mod:`meshlib.core.call`) and hedged (:mod:`meshlib.core.hedged`)
attempt loops: the fallback pick and passing health events on."""

from __future__ import annotations

from typing import Any

from meshlib.core.actions import CallObserver
from meshlib.core.destination import DestinationState
from meshlib.core.health import HealthEvent

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
