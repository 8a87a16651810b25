"""The retry decision: after each attempt, retry (after a delay), finish, or fail.

Shape (Finagle ``RetryPolicy``, tenacity's controller, tower's ``Policy``): a
:class:`RetryPolicy` is built once per policy change from ``policy.retries`` and
``policy.timeout`` and shared by every call and thread; all per-call state lives in a small
:class:`CallState` (tenacity#93: per-call state on a shared object corrupts concurrent
calls). :meth:`RetryPolicy.decide` returns a value, never sleeps:

* :data:`FINISH`: give this outcome to the caller (success, or not retryable by policy);
* :class:`Retry` ``(delay_s)``: sleep, then try again on another endpoint;
* :class:`Fail` ``(reason)``: it was retryable but a retry is refused; give the last outcome
  to the caller and count ``reason`` (attempts exhausted, budget exhausted, deadline would be
  exceeded, not idempotent, body not replayable, server pushback).

Checks, in order:

1. ``retry_on`` / ``grpc_retry_on`` select the outcome (:mod:`meshlib.core.outcome`, Envoy).
2. Idempotency (RFC 9110 9.2.2): only methods in ``retries.methods`` are retried, plus POST
   with an ``Idempotency-Key`` header when ``allow_post_with_idempotency_key``. A connect
   failure or a refused stream is retried whatever the method: the request provably never
   reached the application (RFC 9110 9.2.2 "some means to detect that the original request
   was never applied"; RFC 9113 8.7 REFUSED_STREAM). gRPC calls are retried on the status
   codes only, as gRPC A6 does (gRPC has no method semantics; ``grpc_retry_on`` is the
   opt-in).
3. Replayability: a body that cannot be sent again (a generator, httpx ``StreamConsumed``) is
   never retried (tower's ``clone_request``).
4. Attempts: ``retries.attempts`` counts the first attempt (gRPC A6 ``maxAttempts``).
5. Delay: ``Retry-After`` (RFC 9110 10.2.3) or gRPC ``grpc-retry-pushback-ms`` (A6: a
   negative or unparseable value means "do not retry") replace the backoff; otherwise
   exponential backoff with full jitter (AWS architecture blog "Exponential Backoff And
   Jitter"; Envoy and gRPC defaults): retry n waits ``uniform(0, min(base * 2**(n-1), max))``.
6. Deadline: no retry whose delay would reach the overall deadline.
7. Budget: a :class:`~meshlib.core.budget.RetryBudget` withdrawal (Finagle).

Hedging (gRPC A6 hedging policy) is exposed as data (:class:`HedgingPlan`) plus
:meth:`RetryPolicy.may_hedge`; the driver owns timers and cancellation.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final

from tenacity import wait_exponential

from meshlib.core.budget import RetryBudget
from meshlib.core.deadline import Deadline
from meshlib.core.outcome import Outcome, grpc_code_key, is_retryable_http

__all__ = [
    "FINISH",
    "IDEMPOTENCY_KEY_HEADER",
    "PUSHBACK_HEADER",
    "RETRY_AFTER_HEADER",
    "Backoff",
    "CallState",
    "Fail",
    "FailReason",
    "Finish",
    "HedgingPlan",
    "Retry",
    "RetryPolicy",
    "is_idempotent",
    "parse_pushback_ms",
    "parse_retry_after",
]

RETRY_AFTER_HEADER: Final = "retry-after"
PUSHBACK_HEADER: Final = "grpc-retry-pushback-ms"
IDEMPOTENCY_KEY_HEADER: Final = "idempotency-key"

#: Value of :func:`parse_pushback_ms` meaning "the server asked not to retry" (gRPC A6).
NO_RETRY_PUSHBACK: Final = -1.0

_NEVER_SENT = frozenset({Outcome.CONNECT_FAILURE, Outcome.REFUSED_STREAM})


# --------------------------------------------------------------------------- decisions


class Finish:
    """Give this outcome to the caller: it succeeded, or the policy does not retry it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FINISH"


FINISH: Final = Finish()


@dataclass(frozen=True, slots=True)
class Retry:
    """Sleep ``delay_s`` seconds, then start the next attempt (on another endpoint)."""

    delay_s: float


class FailReason:
    """Why a retryable attempt is not retried (stable strings for metric labels)."""

    ATTEMPTS_EXHAUSTED: Final = "attempts_exhausted"
    BUDGET_EXHAUSTED: Final = "budget_exhausted"
    DEADLINE: Final = "deadline_exceeded"
    NOT_IDEMPOTENT: Final = "not_idempotent"
    NOT_REPLAYABLE: Final = "body_not_replayable"
    PUSHBACK: Final = "server_pushback"


@dataclass(frozen=True, slots=True)
class Fail:
    """A retry was wanted but refused; the last outcome goes to the caller."""

    reason: str


_FAILS = {
    r: Fail(r)
    for r in (
        FailReason.ATTEMPTS_EXHAUSTED, FailReason.BUDGET_EXHAUSTED, FailReason.DEADLINE,
        FailReason.NOT_IDEMPOTENT, FailReason.NOT_REPLAYABLE, FailReason.PUSHBACK,
    )
}

Decision = Finish | Retry | Fail


# --------------------------------------------------------------------------- header parsing


def parse_retry_after(value: str | None, wall_now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 10.2.3) in seconds: delay-seconds, or an HTTP-date relative
    to ``wall_now`` (epoch seconds; dates need it). Invalid or absent: ``None``."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    if wall_now is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - wall_now)


def parse_pushback_ms(value: str | None) -> float | None:
    """``grpc-retry-pushback-ms`` in seconds (gRPC A6): absent ``None``; a non-negative
    integer gives its delay; negative or unparseable gives :data:`NO_RETRY_PUSHBACK`."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) / 1000.0
    return NO_RETRY_PUSHBACK


# --------------------------------------------------------------------------- idempotency


def is_idempotent(method: str, headers_has_idempotency_key: bool, policy: Any) -> bool:
    """RFC 9110 9.2.2 as configured: ``method`` in ``policy.methods`` (the idempotent methods
    by default), or POST carrying an ``Idempotency-Key`` when
    ``policy.allow_post_with_idempotency_key``. ``policy`` is ``policy.retries`` (or a
    :class:`RetryPolicy`)."""
    m = method.upper()
    methods = policy.methods
    if m in methods:
        return True
    return m == "POST" and headers_has_idempotency_key and bool(
        policy.allow_post_with_idempotency_key
    )


# --------------------------------------------------------------------------- backoff


class Backoff:
    """Exponential backoff with full jitter: retry ``n`` (1-based) waits
    ``rng.uniform(0, min(base * 2**(n-1), max))``.

    The ceilings come from tenacity's ``wait_exponential(multiplier=base, max=max)`` used as a
    pure function, computed once here. tenacity's own full-jitter strategy
    (``wait_random_exponential``) draws from the global ``random`` module, so it cannot take
    the injected, seedable RNG; ``wait_exponential_jitter`` adds jitter on top of the
    exponential instead of drawing over the whole interval. So tenacity provides the
    ceiling and the injected ``rng`` the draw.
    """

    __slots__ = ("base", "max", "_rng", "_caps")

    _PRECOMPUTED = 32

    def __init__(self, base: float, max: float, rng: random.Random) -> None:  # noqa: A002
        if base <= 0 or max < base:
            raise ValueError(f"backoff needs 0 < base <= max, got base={base!r} max={max!r}")
        self.base = base
        self.max = max
        self._rng = rng
        wait = wait_exponential(multiplier=base, max=max)
        self._caps = tuple(
            wait(SimpleNamespace(attempt_number=n))  # type: ignore[arg-type]
            for n in range(1, self._PRECOMPUTED + 1)
        )

    def ceiling(self, n: int) -> float:
        """Upper bound of the wait before retry ``n`` (1-based)."""
        if n < 1:
            n = 1
        return self._caps[n - 1] if n <= self._PRECOMPUTED else self.max

    def delay(self, n: int) -> float:
        """A random wait before retry ``n`` (1-based)."""
        return self._rng.uniform(0.0, self.ceiling(n))


# --------------------------------------------------------------------------- hedging


@dataclass(frozen=True, slots=True)
class HedgingPlan:
    """gRPC A6 hedging as data: after ``delay_s`` without a response, send another copy to a
    different endpoint, at most ``max_extra`` extra copies; first response wins. Only for
    idempotent, replayable calls; each extra copy draws on the retry budget."""

    enabled: bool
    delay_s: float
    max_extra: int

    @classmethod
    def from_policy(cls, hedging: Any) -> HedgingPlan:
        if hedging is None:
            return cls(False, 0.0, 0)
        return cls(bool(hedging.enabled), float(hedging.delay), int(hedging.max_extra))


# --------------------------------------------------------------------------- per-call state


_NONE_TRIED: frozenset[str] = frozenset()
_SUCCESS_OUTCOME = Outcome.SUCCESS
#: The deadline of calls with neither a policy timeout nor an inherited one (immutable).
_UNBOUNDED = Deadline(None)


class CallState:
    """Per-call retry state: created per logical call, never shared between calls.

    ``attempt`` is the number of attempts started so far; ``tried`` holds the endpoint keys
    already used (pass it as the balancer's ``exclude``); ``retries`` counts retries taken.
    """

    __slots__ = ("attempt", "tried", "deadline", "idempotent", "replayable", "grpc",
                 "retries", "hedges")

    def __init__(
        self, deadline: Deadline, idempotent: bool, replayable: bool, grpc: bool
    ) -> None:
        self.attempt = 0
        #: a shared empty frozenset until a second attempt needs to exclude the first
        #: (most calls make one attempt: no set allocated for them)
        self.tried: set[str] | frozenset[str] = _NONE_TRIED
        self.deadline = deadline
        self.idempotent = idempotent
        self.replayable = replayable
        self.grpc = grpc
        self.retries = 0
        self.hedges = 0

    def begin_attempt(self, endpoint_key: str) -> None:
        """Record that an attempt is starting on ``endpoint_key``."""
        self.attempt += 1
        tried = self.tried
        if tried is _NONE_TRIED:
            self.tried = {endpoint_key}  # a set display: no global lookup, no add() call
        else:
            tried.add(endpoint_key)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- the policy


class RetryPolicy:
    """Built once from ``policy.retries`` and ``policy.timeout``; shared by all calls."""

    __slots__ = (
        "attempts", "per_try_timeout", "timeout", "retry_on", "retriable_status_codes",
        "grpc_retry_on", "methods", "allow_post_with_idempotency_key", "backoff", "budget",
        "hedging", "_now",
    )

    def __init__(
        self,
        retries: Any,
        timeout: float | None,
        *,
        now: Callable[[], float],
        rng: random.Random,
        budget: RetryBudget | None = None,
    ) -> None:
        self.attempts = int(retries.attempts)
        if self.attempts < 1:
            raise ValueError(f"retries.attempts must be >= 1, got {self.attempts!r}")
        self.per_try_timeout: float | None = retries.per_try_timeout
        self.timeout = timeout
        self.retry_on = frozenset(retries.retry_on)
        self.retriable_status_codes = frozenset(retries.retriable_status_codes)
        self.grpc_retry_on = frozenset(grpc_code_key(c) for c in retries.grpc_retry_on)
        self.methods = frozenset(m.upper() for m in retries.methods)
        self.allow_post_with_idempotency_key = bool(retries.allow_post_with_idempotency_key)
        b = retries.backoff
        self.backoff = Backoff(b.base, b.max, rng)
        if budget is None and getattr(retries, "budget", None) is not None:
            budget = RetryBudget.from_policy(retries.budget, now)
        self.budget = budget
        self.hedging = HedgingPlan.from_policy(getattr(retries, "hedging", None))
        self._now = now

    @classmethod
    def from_policy(
        cls, policy: Any, *, now: Callable[[], float], rng: random.Random,
        budget: RetryBudget | None = None,
    ) -> RetryPolicy:
        """From a whole policy (``policy.retries`` and ``policy.timeout``)."""
        return cls(policy.retries, policy.timeout, now=now, rng=rng, budget=budget)

    # ---------------------------------------------------------------- per call

    def new_call(
        self,
        method: str = "GET",
        *,
        has_idempotency_key: bool = False,
        replayable: bool = True,
        grpc: bool = False,
        now: float | None = None,
        deadline: Deadline | None = None,
    ) -> CallState:
        """Start a logical call: deposits into the budget and fixes the deadline.

        ``deadline`` (e.g. decoded from an incoming ``grpc-timeout``) is combined with the
        policy timeout; the earlier wins.
        """
        t = self._now() if now is None else now
        idem = True if grpc else is_idempotent(method, has_idempotency_key, self)
        return CallState(self.deposit_and_deadline(t, deadline), idem, replayable, grpc)

    def deposit_and_deadline(self, t: float, deadline: Deadline | None) -> Deadline:
        """A logical call starts at ``t``: **deposits one request into the retry budget**
        (once per call, never per attempt) and returns the call's overall deadline, the
        earlier of ``t + timeout`` and ``deadline`` (inherited or the caller's). The call
        plan's entry; :meth:`new_call` adds the idempotency decision and the state."""
        if self.budget is not None:
            self.budget.deposit(t)
        timeout = self.timeout
        if timeout is None:
            return _UNBOUNDED if deadline is None else deadline
        if deadline is not None and deadline.at is not None and deadline.at < t + timeout:
            return deadline
        return Deadline(t + timeout)

    def attempt_timeout(self, state: CallState, now: float) -> float | None:
        """Timeout of the next attempt: ``min(per_try_timeout, remaining overall)``."""
        return state.deadline.per_try(now, self.per_try_timeout)

    def is_retryable(self, state: CallState, outcome: Outcome, status: int | None,
                     grpc_code: str | None = None) -> bool:
        """Only the ``retry_on`` / ``grpc_retry_on`` selection (step 1)."""
        if state.grpc:
            if grpc_code is None:
                # Transport-level failure of a gRPC call: never reached the server?
                return outcome in _NEVER_SENT and "UNAVAILABLE" in self.grpc_retry_on
            return grpc_code in self.grpc_retry_on or (
                grpc_code_key(grpc_code) in self.grpc_retry_on
            )
        return is_retryable_http(outcome, status, self.retry_on, self.retriable_status_codes)

    def decide_after(self, state: CallState, result: Any, now: float) -> Decision:
        """:meth:`decide` for an attempt's ``AttemptResult`` (the call plan's form: one
        positional call, and an attempt that succeeded returns FINISH before any field of
        ``result`` but its outcome is read)."""
        outcome = result.outcome
        if outcome is _SUCCESS_OUTCOME:
            return FINISH
        return self.decide(state, outcome, result.status, result.retry_after_s, now,
                           grpc_code=result.grpc_code, pushback_s=result.pushback_s)

    def decide(
        self,
        state: CallState,
        outcome: Outcome,
        status: int | None = None,
        retry_after_s: float | None = None,
        now: float | None = None,
        *,
        grpc_code: str | None = None,
        pushback_s: float | None = None,
    ) -> Decision:
        """Decide what follows an attempt. ``status`` is the HTTP status (``None`` when there
        was no response); ``grpc_code`` the gRPC status name for gRPC calls;
        ``retry_after_s`` / ``pushback_s`` come from :func:`parse_retry_after` /
        :func:`parse_pushback_ms`."""
        if outcome is Outcome.SUCCESS:
            return FINISH
        if not self.is_retryable(state, outcome, status, grpc_code):
            return FINISH
        if not state.idempotent and outcome not in _NEVER_SENT:
            return _FAILS[FailReason.NOT_IDEMPOTENT]
        if not state.replayable:
            return _FAILS[FailReason.NOT_REPLAYABLE]
        if state.attempt >= self.attempts:
            return _FAILS[FailReason.ATTEMPTS_EXHAUSTED]
        if pushback_s is not None:
            if pushback_s < 0 or math.isnan(pushback_s):
                return _FAILS[FailReason.PUSHBACK]
            delay = pushback_s
        elif retry_after_s is not None and retry_after_s >= 0:
            delay = retry_after_s
        else:
            delay = self.backoff.delay(state.retries + 1)
        t = self._now() if now is None else now
        left = state.deadline.remaining(t)
        if left is not None and delay >= left:
            return _FAILS[FailReason.DEADLINE]
        if self.budget is not None and not self.budget.try_withdraw(t):
            return _FAILS[FailReason.BUDGET_EXHAUSTED]
        state.retries += 1
        return Retry(delay)

    # ---------------------------------------------------------------- hedging

    def may_hedge(self, state: CallState, now: float | None = None) -> bool:
        """Whether the driver may send one more hedged copy now (and take it from the budget).

        The driver calls this when ``hedging.delay_s`` passed without a response."""
        h = self.hedging
        if not h.enabled or state.hedges >= h.max_extra:
            return False
        if not state.idempotent or not state.replayable:
            return False
        t = self._now() if now is None else now
        left = state.deadline.remaining(t)
        if left is not None and left <= 0:
            return False
        if self.budget is not None and not self.budget.try_withdraw(t):
            return False
        state.hedges += 1
        return True
