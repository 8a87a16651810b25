"""Per-endpoint passive health: a circuit breaker and Envoy-style outlier ejection.

State lives in one :class:`HealthSlot` per endpoint, keyed by ``Endpoint.key`` in a
:class:`HealthRegistry` shared across snapshots (call :meth:`HealthRegistry.prune` with the
new key set when a snapshot arrives). Every slot keeps one float, ``blocked_until``: the
balancer skips an endpoint while ``blocked_until > now``, so ``usable()`` is one comparison.
State changes are returned as :class:`HealthEvent` values (EJECTED, UNEJECTED,
EJECTION_SKIPPED, BREAKER_OPENED, BREAKER_HALF_OPEN, BREAKER_CLOSED) for the driver to log
and count; nothing here logs, sleeps or starts timers.

Circuit breaker (Nygard, "Release It!"; pybreaker's state machine, made non-serialising and
monotonic): CLOSED -> OPEN after ``failure_threshold`` consecutive failures; OPEN for
``reset_timeout``; then HALF_OPEN admits at most ``half_open_max_calls`` concurrent trial
calls; a trial success closes it, a trial failure re-opens it. Unlike pybreaker's
``call()``, nothing is held while the call runs (pybreaker holds an RLock across the call,
serialising all callers), and unlike its ``calling()`` the half-open state really admits only
``half_open_max_calls`` callers. Use :meth:`HealthRegistry.admit` before the attempt and
:meth:`HealthRegistry.record` after it, always (try/finally), or a trial slot leaks.
:func:`meshlib.core.breaker_mirror.pybreaker_mirror` exposes a slot as a
``pybreaker.CircuitBreaker`` (storage backed by the slot) so pybreaker's listeners fire on our transitions; see ``docs/core.md``.

Outlier detection (Envoy ``outlier_detection``, architecture overview "Outlier detection"):

* ``consecutive_5xx``: 5xx responses and local-origin errors (connect failure, reset,
  refused stream, timeout); ``consecutive_gateway_failure``: 502/503/504 and local-origin
  errors. A non-5xx response resets both; a 5xx that is not a gateway error resets the
  gateway counter (Envoy ``putHttpResponseCode``). LOCAL outcomes change nothing.
  Departure: Envoy enforces gateway-failure ejections at 0 % by default; here both
  detectors are enforced when configured.
* Ejection is allowed when, counting this one, ejected endpoints stay within
  ``max_ejection_percent`` of the registry; with ``always_eject_one_host`` (Envoy >= 1.31,
  default off) one ejection is allowed regardless. So with the default
  10 %, fewer than 10 endpoints means no outlier ejection, exactly as in Envoy; the circuit
  breaker still protects small sets. A refused ejection is reported once per failure streak
  (EJECTION_SKIPPED) and retried on the next failure.
* Ejection time = ``base_ejection_time * backoff``, capped at ``max(max_ejection_time,
  base_ejection_time)``, where ``backoff`` grows by one per ejection while ``base * backoff <
  max`` and shrinks by one per ``interval`` the endpoint spends un-ejected (Envoy
  ``checkHostForUneject``). Envoy decrements on its interval timer; here the decrement is
  computed lazily from the clock at the next ejection, with the same result and no timer.
* External verdicts: :meth:`HealthRegistry.mark_unhealthy` / :meth:`HealthRegistry.mark_healthy`
  (active health checks, any driver) hold an endpoint out of traffic through the same
  ``blocked_until``; every breaker and ejection transition recomputes it from all sources
  (:meth:`HealthRegistry._reblock`), so no writer can undo another's hold.
* A policy change applies whole at once (:meth:`HealthRegistry.configure`): a breaker turned
  off closes, an ejection of a detection turned off ends, new times replace old ones.
* An ejection ends when its time has passed: the balancer sees it at once through
  ``blocked_until``; the UNEJECTED event is returned by the next :meth:`HealthRegistry.record`
  for that endpoint or by :meth:`HealthRegistry.sweep` (call it every ``interval`` if you
  want timely events). Envoy un-ejects only on its interval timer, so its ejections last up
  to one interval longer.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from meshlib.core.endpoints import Endpoint, endpoint_key
from meshlib.core.outcome import (
    Outcome,
    counts_as_5xx_for_outlier,
    counts_as_failure_for_breaker,
    counts_as_gateway_failure,
    is_success_for_health,
)

__all__ = [
    "ADMIT",
    "CLOSED",
    "FIRST_TRIAL",
    "HALF_OPEN",
    "OPEN",
    "REJECT",
    "TRIAL",
    "EventKind",
    "HealthEvent",
    "HealthRegistry",
    "HealthSlot",
]

# Breaker states: the same strings as pybreaker's STATE_CLOSED / STATE_OPEN / STATE_HALF_OPEN.
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half-open"

# Admission results of HealthRegistry.admit (ints: cheap to return and compare).
REJECT: Final = 0
ADMIT: Final = 1
TRIAL: Final = 2  # a half-open trial call
FIRST_TRIAL: Final = 3  # a trial call whose admission moved the breaker to half-open

_INF = math.inf
_NO_EVENTS: tuple[HealthEvent, ...] = ()
_SUCCESS = Outcome.SUCCESS


class EventKind(enum.Enum):
    EJECTED = "ejected"
    UNEJECTED = "unejected"
    EJECTION_SKIPPED = "ejection_skipped"  # would exceed max_ejection_percent
    BREAKER_OPENED = "breaker_opened"
    BREAKER_HALF_OPEN = "breaker_half_open"
    BREAKER_CLOSED = "breaker_closed"


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """A state change of one endpoint. ``reason`` says why (e.g. ``"consecutive_5xx"``),
    ``duration_s`` is the ejection or open time, ``count`` the number of ejections so far
    or the failure count that opened the breaker."""

    kind: EventKind
    key: str
    at: float
    reason: str = ""
    duration_s: float = 0.0
    count: int = 0


class HealthSlot:
    """Health state of one endpoint (breaker and outlier fields)."""

    __slots__ = (
        "key", "blocked_until",
        "state", "failures", "opened_at", "open_until", "trials",
        "c5xx", "cgw", "ejected_at", "ejected_until", "ejecting", "backoff", "ejections",
        "last_uneject", "skip_reported", "unhealthy_until", "quiet", "lock",
    )

    def __init__(self, key: str) -> None:
        self.key = key
        self.blocked_until = 0.0
        # breaker
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.open_until = 0.0
        self.trials = 0
        # outlier
        self.c5xx = 0
        self.cgw = 0
        self.ejected_at = 0.0
        self.ejected_until = 0.0
        self.ejecting = False  # ejected and the UNEJECTED event not yet reported
        self.backoff = 0
        self.ejections = 0
        self.last_uneject: float | None = None
        self.skip_reported = False
        # external (active health checks): skipped by the balancer until this time
        self.unhealthy_until = 0.0
        #: THE "healthy endpoint" condition, kept current by every writer of the fields it
        #: reads (:meth:`HealthRegistry._settle`): no breaker failures, no outlier counters,
        #: no ejection to report, no skipped ejection reported. An admitted success on a
        #: quiet slot changes nothing, so :meth:`HealthRegistry.record` (and the call plan,
        #: reading the same flag) return at once.
        self.quiet = True
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"HealthSlot({self.key!r}, state={self.state}, failures={self.failures}, "
                f"ejected_until={self.ejected_until}, backoff={self.backoff})")


def _key(ep: Endpoint | str) -> str:
    return ep if isinstance(ep, str) else endpoint_key(ep)


class HealthRegistry:
    """Breaker and outlier state of every endpoint of one destination service.

    ``breaker`` is ``policy.circuit_breaker`` and ``outlier`` is
    ``policy.outlier_detection`` (duck-typed; ``None`` or ``enabled: false`` disables).
    """

    def __init__(self, breaker: Any, outlier: Any, now: Callable[[], float]) -> None:
        self._now = now
        self._slots: dict[str, HealthSlot] = {}
        #: endpoint key -> slot (read-only for callers: the call plan's inlined fast path)
        self.slots = self._slots
        self.configure(breaker, outlier)

    def configure(self, breaker: Any, outlier: Any) -> tuple[HealthEvent, ...]:
        """Apply new settings (on a policy change): the new policy is in force, whole, for
        the next call. Per-endpoint counters are kept, but state the new settings would
        not have produced ends now: a breaker that is turned off closes, an open breaker's
        time is ``opened_at`` + the new ``reset_timeout``, an outlier detection that is
        turned off ends every ejection, an ejection ends at most ``max_ejection_time``
        after it began. Returns the BREAKER_CLOSED / UNEJECTED events of those endings
        (reason ``"policy_changed"``) for the driver's telemetry and listeners."""
        self.breaker_enabled = breaker is not None and bool(getattr(breaker, "enabled", True))
        if self.breaker_enabled:
            self.failure_threshold = int(breaker.failure_threshold)
            self.reset_timeout = float(breaker.reset_timeout)
            self.half_open_max_calls = int(breaker.half_open_max_calls)
        else:
            self.failure_threshold, self.reset_timeout, self.half_open_max_calls = 0, 0.0, 0
        self.outlier_enabled = outlier is not None and bool(getattr(outlier, "enabled", True))
        if self.outlier_enabled:
            self.consecutive_5xx = int(outlier.consecutive_5xx)
            self.consecutive_gateway_failure = int(outlier.consecutive_gateway_failure)
            self.interval = float(outlier.interval)
            self.base_ejection_time = float(outlier.base_ejection_time)
            self.max_ejection_time = max(float(outlier.max_ejection_time),
                                         self.base_ejection_time)
            self.max_ejection_percent = float(outlier.max_ejection_percent)
            self.always_eject_one_host = bool(outlier.always_eject_one_host)
        if not self._slots:
            return _NO_EVENTS
        now = self._now()
        events: list[HealthEvent] = []
        for s in list(self._slots.values()):
            with s.lock:
                if not self.breaker_enabled:
                    if s.state is not CLOSED:
                        events.append(HealthEvent(EventKind.BREAKER_CLOSED, s.key, now,
                                                  "policy_changed"))
                    s.state = CLOSED
                    s.failures = 0
                    s.trials = 0
                    s.open_until = 0.0
                elif s.state is OPEN:
                    s.open_until = s.opened_at + self.reset_timeout
                if s.ejecting or s.ejected_until > now:
                    if not self.outlier_enabled:
                        s.ejected_until = now
                    elif s.ejected_until > s.ejected_at + self.max_ejection_time:
                        s.ejected_until = s.ejected_at + self.max_ejection_time
                    if s.ejecting and s.ejected_until <= now:
                        s.ejecting = False
                        s.last_uneject = s.ejected_until
                        events.append(HealthEvent(EventKind.UNEJECTED, s.key, now,
                                                  "policy_changed", count=s.ejections))
                if not self.outlier_enabled:
                    s.c5xx = s.cgw = 0
                    s.skip_reported = False
                self._reblock(s)
                self._settle(s)
        return tuple(events)

    # ---------------------------------------------------------------- registry

    def slot(self, key: str) -> HealthSlot:
        s = self._slots.get(key)
        if s is None:
            s = self._slots.setdefault(key, HealthSlot(key))
        return s

    def get(self, ep: Endpoint | str) -> HealthSlot | None:
        return self._slots.get(_key(ep))

    def prune(self, alive: Iterable[str]) -> list[str]:
        """Keep exactly the endpoints in ``alive`` (creating slots for new ones); returns
        removed keys. The registry's size is the denominator of ``max_ejection_percent``."""
        keep = set(alive)
        gone = [k for k in list(self._slots) if k not in keep]
        for k in gone:
            self._slots.pop(k, None)
        for k in keep:
            self.slot(k)
        return gone

    def __len__(self) -> int:
        return len(self._slots)

    # ---------------------------------------------------------------- reads

    def usable(self, ep: Endpoint | str, now: float) -> bool:
        """Not ejected, and the breaker is closed or due for a trial with room for one."""
        s = self._slots.get(_key(ep))
        return s is None or s.blocked_until <= now

    def ejected_count(self, now: float) -> int:
        n = 0
        for s in self._slots.values():
            if s.ejected_until > now:
                n += 1
        return n

    def state(self, ep: Endpoint | str) -> str:
        s = self._slots.get(_key(ep))
        return CLOSED if s is None else s.state

    # ---------------------------------------------------------------- breaker

    def _reblock(self, s: HealthSlot) -> None:
        """Recompute ``blocked_until``, the one float the balancer reads, from everything
        that keeps an endpoint out of traffic: an ejection, an active health check's
        verdict (:meth:`mark_unhealthy`), an open breaker, a half-open breaker whose trial
        places are all taken."""
        b = s.ejected_until
        if s.unhealthy_until > b:
            b = s.unhealthy_until
        if s.state is OPEN:
            if s.open_until > b:
                b = s.open_until
        elif s.state is HALF_OPEN and s.trials >= self.half_open_max_calls:
            b = _INF
        s.blocked_until = b

    @staticmethod
    def _settle(s: HealthSlot) -> None:
        """Recompute :attr:`HealthSlot.quiet` after the fields it reads were written."""
        s.quiet = not (s.ejecting or s.failures or s.c5xx or s.cgw or s.skip_reported)

    # ---------------------------------------------------------------- external verdicts

    def mark_unhealthy(self, key: str, until: float) -> None:
        """An outside check (active health checking) found endpoint ``key`` unhealthy: the
        balancer skips it until ``until`` (monotonic clock) or :meth:`mark_healthy`,
        whichever comes first. Breaker and ejection state are kept and still apply; a
        later mark with a later ``until`` extends the hold. Unknown keys are ignored."""
        s = self._slots.get(key)
        if s is None:
            return
        with s.lock:
            if until > s.unhealthy_until:
                s.unhealthy_until = until
            self._reblock(s)

    def mark_healthy(self, key: str) -> None:
        """An outside check passes again for ``key``: lift :meth:`mark_unhealthy`'s hold (a
        breaker or ejection still in force keeps the endpoint out)."""
        s = self._slots.get(key)
        if s is None:
            return
        with s.lock:
            s.unhealthy_until = 0.0
            self._reblock(s)

    def unhealthy(self, key: str, now: float) -> bool:
        """Whether an outside check holds ``key`` out of traffic at ``now``."""
        s = self._slots.get(key)
        return s is not None and s.unhealthy_until > now

    def admit(self, ep: Endpoint | str, now: float) -> int:
        """Breaker admission for an attempt to ``ep``: REJECT, ADMIT, TRIAL or FIRST_TRIAL.

        Pass the result to :meth:`record` when the attempt ends."""
        if not self.breaker_enabled:
            return ADMIT
        s = self._slots.get(ep if isinstance(ep, str) else ep.key)
        if s is None:
            s = self.slot(_key(ep))
        if s.state is CLOSED:
            return ADMIT
        with s.lock:
            first = False
            if s.state is OPEN:
                if now < s.open_until:
                    return REJECT
                s.state = HALF_OPEN
                s.trials = 0
                first = True
            if s.state is HALF_OPEN:
                if s.trials < self.half_open_max_calls:
                    s.trials += 1
                    self._reblock(s)
                    return FIRST_TRIAL if first else TRIAL
                return REJECT
            return ADMIT

    def _open(self, s: HealthSlot, now: float, reason: str) -> HealthEvent:
        s.state = OPEN
        s.opened_at = now
        s.open_until = now + self.reset_timeout
        s.trials = 0
        count = s.failures
        s.failures = 0
        self._reblock(s)
        return HealthEvent(EventKind.BREAKER_OPENED, s.key, now, reason,
                           self.reset_timeout, count)

    def _record_breaker(
        self, s: HealthSlot, outcome: Outcome, admission: int, now: float
    ) -> list[HealthEvent] | None:
        fail = counts_as_failure_for_breaker(outcome)
        if admission >= TRIAL:
            events: list[HealthEvent] = []
            if admission == FIRST_TRIAL:
                events.append(HealthEvent(EventKind.BREAKER_HALF_OPEN, s.key, now))
            with s.lock:
                if s.trials > 0:
                    s.trials -= 1
                if s.state is HALF_OPEN:
                    if fail:
                        s.failures += 1
                        events.append(self._open(s, now, "trial_failed"))
                    elif is_success_for_health(outcome):
                        s.state = CLOSED
                        s.failures = 0
                        events.append(HealthEvent(EventKind.BREAKER_CLOSED, s.key, now,
                                                  "trial_succeeded"))
                self._reblock(s)
            return events
        if s.state is not CLOSED:
            return None  # admitted before the breaker opened: its result is stale
        if fail:
            s.failures += 1
            if s.failures >= self.failure_threshold:
                with s.lock:
                    if s.state is CLOSED and s.failures >= self.failure_threshold:
                        return [self._open(s, now, "consecutive_failures")]
        elif s.failures and is_success_for_health(outcome):
            s.failures = 0
        return None

    # ---------------------------------------------------------------- outlier

    def _finish_ejection(self, s: HealthSlot, now: float) -> HealthEvent | None:
        """Report an ejection whose time has passed."""
        if s.ejecting and s.ejected_until <= now:
            s.ejecting = False
            s.last_uneject = s.ejected_until
            return HealthEvent(EventKind.UNEJECTED, s.key, now, "ejection_time_elapsed",
                               count=s.ejections)
        return None

    def _try_eject(self, s: HealthSlot, now: float, reason: str,
                   at_threshold: bool) -> HealthEvent | None:
        total = len(self._slots)
        ejected = self.ejected_count(now)
        allowed = (ejected + 1) * 100 <= self.max_ejection_percent * total or (
            self.always_eject_one_host and ejected == 0
        )
        if not allowed:
            if at_threshold and not s.skip_reported:
                s.skip_reported = True
                return HealthEvent(EventKind.EJECTION_SKIPPED, s.key, now, reason,
                                   count=ejected)
            return None
        base = self.base_ejection_time
        if s.backoff and s.last_uneject is not None and now > s.last_uneject:
            healthy_intervals = int((now - s.last_uneject) / self.interval)
            s.backoff = max(0, s.backoff - healthy_intervals)
        if base * s.backoff < self.max_ejection_time:
            s.backoff += 1
        duration = min(base * s.backoff, self.max_ejection_time)
        s.ejections += 1
        s.ejected_at = now
        s.ejected_until = now + duration
        s.ejecting = True
        s.c5xx = 0
        s.cgw = 0
        s.skip_reported = False
        self._reblock(s)
        return HealthEvent(EventKind.EJECTED, s.key, now, reason, duration, s.ejections)

    def _record_outlier(self, s: HealthSlot, outcome: Outcome, now: float,
                        events: list[HealthEvent] | None) -> list[HealthEvent] | None:
        if counts_as_5xx_for_outlier(outcome):
            s.c5xx += 1
            if counts_as_gateway_failure(outcome):
                s.cgw += 1
            else:
                s.cgw = 0
            if s.ejected_until > now:
                return events
            if s.c5xx >= self.consecutive_5xx:
                reason, at = "consecutive_5xx", s.c5xx == self.consecutive_5xx
            elif s.cgw >= self.consecutive_gateway_failure:
                reason, at = "consecutive_gateway_failure", (
                    s.cgw == self.consecutive_gateway_failure)
            else:
                return events
            ev = self._try_eject(s, now, reason, at)
            if ev is not None:
                events = [ev] if events is None else [*events, ev]
        elif is_success_for_health(outcome):
            s.c5xx = 0
            s.cgw = 0
            s.skip_reported = False
        return events

    # ---------------------------------------------------------------- results

    def record(
        self, ep: Endpoint | str, outcome: Outcome, admission: int, now: float
    ) -> tuple[HealthEvent, ...]:
        """An attempt admitted with ``admission`` ended with ``outcome``: update the breaker
        and outlier counters; returns the state changes (usually none)."""
        s = self._slots.get(ep if isinstance(ep, str) else ep.key)
        if s is None:
            s = self._slots.get(_key(ep))
            if s is None:
                return _NO_EVENTS
        if outcome is _SUCCESS and admission == ADMIT and s.quiet:
            # the common case: a healthy endpoint stays healthy (see HealthSlot.quiet)
            return _NO_EVENTS
        if admission == REJECT:
            return _NO_EVENTS
        events: list[HealthEvent] | None = None
        if s.ejecting and s.ejected_until <= now:
            ev = self._finish_ejection(s, now)
            if ev is not None:
                events = [ev]
        if self.breaker_enabled:
            bev = self._record_breaker(s, outcome, admission, now)
            if bev:
                events = bev if events is None else events + bev
        if self.outlier_enabled and outcome is not Outcome.LOCAL:
            events = self._record_outlier(s, outcome, now, events)
        self._settle(s)
        return _NO_EVENTS if not events else tuple(events)

    def release(self, ep: Endpoint | str, admission: int, now: float) -> tuple[HealthEvent, ...]:
        """The attempt was abandoned (cancelled) without a result: frees a trial slot."""
        return self.record(ep, Outcome.LOCAL, admission, now)

    def sweep(self, now: float) -> tuple[HealthEvent, ...]:
        """Report ejections that have ended (call every ``interval`` for timely events)."""
        events = []
        for s in list(self._slots.values()):
            if s.ejecting and s.ejected_until <= now:
                ev = self._finish_ejection(s, now)
                self._settle(s)
                if ev is not None:
                    events.append(ev)
        return tuple(events)
