"""The per-call plan, shared by every driver: pick -> attempt -> classify -> record -> retry.

A logical call is a generator (sans-I/O, like h11 and tenacity's controller): it yields
*actions* and receives *results*, and never touches a socket, a clock it was not given, or
an event loop. The sync httpx transport drives it with blocking I/O, the async one with
``await``, the gRPC channels and the shim likewise, so they cannot drift apart::

    gen = run_call(dest, plan, ...)
    action = next(gen)
    while True:
        if isinstance(action, Sleep):   sleep(action.seconds); result = None
        else:                           result = <send the attempt to action.endpoint>
        action = gen.send(result)       # StopIteration.value is the CallEnd

The order of decisions follows Envoy's router: fault injection (HTTP fault filter), the
destination's concurrency limit (``max_requests``), route and subset, then per attempt the
zone filter, the balancer (skipping endpoints already tried, ejected or with an open
breaker), breaker admission, the attempt with ``min(per_try_timeout, remaining deadline)``,
and the retry decision (``retry_on``, idempotency, attempts, backoff or Retry-After /
gRPC pushback, deadline, retry budget; gRPC A6 and Finagle budgets).

Hedging (Envoy request hedging, gRPC A6 hedging policy, Finagle backup requests)
---------------------------------------------------------------------------------
When ``retries.hedging.enabled``, the call is idempotent with a replayable body, it is not a
gRPC call (``grpc=True`` never hedges: the gRPC drivers see exactly the protocol above) and
the target has at least two endpoints, the plan runs in *hedged mode*. Otherwise hedging
costs one attribute check in the plan per call (and one, ``action.hedge_after``, in the
driver per attempt; plain attempts read it from the class). In hedged mode:

* an :class:`Attempt` carries ``hedge_after`` (seconds, or ``None``): if no outstanding attempt
  has finished that long after the action was yielded, the driver sends :data:`HEDGE`. Every
  action replaces the previous timer;
* the driver sends each attempt's result as :class:`Done` ``(attempt, result)``, so the plan
  finishes load and health for the right endpoint;
* on :data:`HEDGE` the plan answers with another :class:`Attempt` to an endpoint this call has
  not tried (ring-hash: the next one clockwise), if ``RetryPolicy.may_hedge`` allows it
  (``max_extra``, deadline, retry budget) and the breaker admits it, recording
  ``observer.retry("hedge")``; else with :data:`WAIT` (wait for a result, no more timer);
* the first *final* result (success, or not selected by ``retry_on``) wins: the plan returns
  a :class:`CallEnd` whose ``cancelled`` lists the attempts still outstanding. The plan has
  already released their load counts and breaker trial slots (``health.release``: being
  cancelled is no failure); the driver cancels them and closes their connections;
* a retryable failure while another copy is still in flight does not end the call: the next
  hedge is sent at once if one is allowed (gRPC A6 "the next hedged request in line is sent
  immediately"), else the plan yields :data:`WAIT`. Only when nothing is in flight does the
  normal retry decision run (backoff :class:`Sleep`, then a new round whose first attempt may
  hedge again while ``max_extra`` is not used up). Hedges count as attempts (``CallEnd.attempts``,
  ``retries.attempts`` for a later retry) and each one takes a retry-budget token.

The hedged driver loop::

    action = next(gen)                      # first Attempt with hedge_after set
    while True:
        if Sleep:   sleep; action = gen.send(None); continue
        if Attempt: start it (a task / a pool thread); timer = action.hedge_after
        if WAIT:    timer = None
        wait for the first of: an outstanding attempt finishes -> action = gen.send(Done(a, r))
                               the timer expires              -> action = gen.send(HEDGE)
    # StopIteration: cancel end.cancelled, close every response but end.result.value
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Final, Protocol, cast

from meshlib.core.deadline import Deadline
from meshlib.core.destination import DestinationState, Plan
from meshlib.core.health import ADMIT, CLOSED, REJECT, HealthEvent
from meshlib.core.outcome import Outcome
from meshlib.core.retry import FINISH, CallState, Fail, Retry, is_idempotent

_EMPTY: frozenset[str] = frozenset()
_SUCCESS = Outcome.SUCCESS
_new = object.__new__


class FailureKind:
    """Why the mesh itself failed a call (stable strings: metric label values, error types)."""

    NO_ENDPOINTS: Final = "no_endpoints"
    CIRCUIT_OPEN: Final = "circuit_open"
    CONCURRENCY: Final = "concurrency_limit"
    DEADLINE: Final = "deadline_exceeded"
    FAULT_ABORT: Final = "fault_abort"


class Attempt:
    """Action: send one attempt to ``endpoint`` within ``timeout`` seconds (None = no limit).

    ``number`` counts from 1; ``deadline`` is the call's overall deadline (for the
    propagated timeout header). ``hedge_after`` (hedged mode only, see the module docstring):
    send :data:`HEDGE` if no outstanding attempt finished within that many seconds."""

    __slots__ = ("endpoint", "timeout", "number", "deadline")

    #: None outside hedged mode: a class attribute, so plain attempts pay nothing for it.
    hedge_after: float | None = None

    def __init__(self, endpoint: Any, timeout: float | None, number: int, deadline: Deadline):
        self.endpoint = endpoint
        self.timeout = timeout
        self.number = number
        self.deadline = deadline

    def __repr__(self) -> str:
        ep = self.endpoint
        return (f"Attempt(#{self.number} {getattr(ep, 'key', ep)!r}, timeout={self.timeout!r}, "
                f"hedge_after={self.hedge_after!r})")


class _HedgedAttempt(Attempt):
    __slots__ = ("hedge_after",)  # shadows the class attribute Attempt.hedge_after

    def __init__(self, endpoint: Any, timeout: float | None, number: int, deadline: Deadline,
                 hedge_after: float | None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.number = number
        self.deadline = deadline
        self.hedge_after = hedge_after


class _Signal:
    """A named singleton (:data:`HEDGE`, :data:`WAIT`)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Sent by a hedged-mode driver when an action's ``hedge_after`` passed without a result.
HEDGE: Final = _Signal("HEDGE")
#: Action (hedged mode): start nothing, wait for the next outstanding attempt, no timer.
WAIT: Final = _Signal("WAIT")

#: ``CallObserver.retry`` reason of a hedge (``meshlib_client_retries_total{reason="hedge"}``).
HEDGE_REASON: Final = "hedge"


class Sleep:
    """Action: wait ``seconds`` (backoff or injected delay), then send ``None``."""

    __slots__ = ("seconds", "reason")

    def __init__(self, seconds: float, reason: str):
        self.seconds = seconds
        self.reason = reason


class AttemptResult:
    """What the driver saw of one attempt. ``value`` is the driver's payload (a response,
    an exception) handed back in :class:`CallEnd`."""

    __slots__ = ("outcome", "status", "retry_after_s", "pushback_s", "grpc_code", "value")

    def __init__(
        self,
        outcome: Outcome,
        status: int | None = None,
        value: Any = None,
        *,
        retry_after_s: float | None = None,
        pushback_s: float | None = None,
        grpc_code: str | None = None,
    ):
        self.outcome = outcome
        self.status = status
        self.value = value
        self.retry_after_s = retry_after_s
        self.pushback_s = pushback_s
        self.grpc_code = grpc_code


class Done:
    """Message (hedged mode): ``attempt`` (the :class:`Attempt` action) ended with ``result``."""

    __slots__ = ("attempt", "result")

    def __init__(self, attempt: Attempt, result: AttemptResult):
        self.attempt = attempt
        self.result = result


class CallEnd:
    """How the call ended: the last attempt's ``result`` (None if no attempt was made),
    a mesh ``failure`` kind with ``message`` (None when the last result stands), the
    reason a wanted retry was refused (``stopped``), and ``attempts`` made.

    ``cancelled`` (hedged mode): the attempts still outstanding when the winner arrived; the
    driver cancels them. Their load and breaker slots are already released."""

    __slots__ = ("result", "failure", "message", "stopped", "attempts", "status")

    #: Outside hedged mode every end has no cancelled attempts (a class attribute: free).
    cancelled: tuple[Attempt, ...] = ()

    def __init__(
        self,
        result: AttemptResult | None,
        attempts: int,
        failure: str | None = None,
        message: str = "",
        stopped: str | None = None,
        status: int | str | None = None,
    ):
        self.result = result
        self.attempts = attempts
        self.failure = failure
        self.message = message
        self.stopped = stopped
        self.status = status


class CallObserver(Protocol):
    """Hooks for telemetry (a structural type: the telemetry recorders implement it)."""

    def retry(self, reason: str) -> None:
        """A retry was decided after an attempt that ended with ``reason`` (outcome name)."""

    def stopped(self, reason: str) -> None:
        """A retry was wanted but refused (``FailReason``)."""

    def health(self, events: tuple[HealthEvent, ...]) -> None:
        """Breaker / outlier state changes."""


class _NullObserver:
    """The observer that records nothing."""

    def retry(self, reason: str) -> None:
        pass

    def stopped(self, reason: str) -> None:
        pass

    def health(self, events: tuple[HealthEvent, ...]) -> None:
        pass


NULL_OBSERVER: Final[CallObserver] = _NullObserver()

class _HedgedEnd(CallEnd):
    __slots__ = ("cancelled",)  # shadows the class attribute CallEnd.cancelled


Action = Attempt | Sleep
CallGen = Generator[Action, "AttemptResult | None", CallEnd]
#: What a hedged-mode driver really talks to (``run_call`` is typed as the non-hedged
#: :data:`CallGen` so drivers that never hedge, such as gRPC's, keep their types).
HedgedCallGen = Generator["Attempt | Sleep | _Signal", "Done | _Signal | None", CallEnd]


def run_call(
    dest: DestinationState,
    plan: Plan,
    *,
    method: str,
    path: str = "/",
    header: Callable[[str], str | None] | None = None,
    has_idempotency_key: Callable[[], bool] | None = None,
    replayable: bool = True,
    deadline: Deadline | None = None,
    grpc: bool = False,
    observer: CallObserver = NULL_OBSERVER,
) -> CallGen:
    """One logical call as a generator of actions (see the module docstring)."""
    now = dest.now
    service = dest.service

    if plan.faults_active:
        faults = plan.faults
        delay, abort = faults.decide_grpc(dest.rng) if grpc else faults.decide(dest.rng)
        if delay:
            yield Sleep(delay, "fault_delay")
        if abort is not None:
            return CallEnd(None, 0, FailureKind.FAULT_ABORT,
                           f"service {service!r}: request aborted by fault injection policy",
                           status=abort)

    if not plan.endpoint_count:
        return CallEnd(None, 0, FailureKind.NO_ENDPOINTS,
                       f"service {service!r} has no endpoints in etcd")
    tokens = dest.tokens
    try:  # DestinationState.acquire, inlined
        tokens.pop()
    except IndexError:
        return CallEnd(None, 0, FailureKind.CONCURRENCY,
                       f"service {service!r}: concurrency limit reached "
                       f"({plan.max_requests} requests in flight)")
    try:
        lookup = header if header is not None else _no_header
        if plan.has_header_routes:
            target = plan.router.resolve(method, path, lookup, dest.rng)
        else:
            target = plan.router.default
        candidates_all = target.endpoints
        if not candidates_all:
            return CallEnd(None, 0, FailureKind.NO_ENDPOINTS,
                           f"service {service!r}: subset {target.subset!r} of route "
                           f"{target.route!r} has no endpoints")
        hash_key = None
        src = plan.hash_source
        if src is not None:
            hash_key = _hash_key(src, lookup)
        t = now()
        retry = plan.retry
        if grpc:
            idempotent = True
        else:
            idempotent = is_idempotent(
                method, has_idempotency_key is not None and method not in retry.methods
                and has_idempotency_key(), retry)
        dl = retry.deadline_for(t, deadline)  # also deposits into the retry budget
        if plan.hedging and not grpc and idempotent and replayable and len(candidates_all) > 1:
            hedged = CallState(dl, idempotent, replayable, grpc)
            return (yield from cast(CallGen, _run_hedged(dest, plan, hedged, candidates_all,
                                                         hash_key, observer, t)))
        # The retry state (CallState) is made when a first attempt fails and RetryPolicy.decide
        # needs it; until then the attempt count and the endpoints tried are local.
        state: CallState | None = None
        n = 0
        tried: set[str] | frozenset[str] = _EMPTY
        at = dl.at
        result: AttemptResult | None = None
        health = dest.health
        stats = dest.stats
        balancer = plan.balancer
        zoned = plan.zoned
        per_try = retry.per_try_timeout
        health_slots = health.slots
        load_slots = stats.slots
        rejects = 0
        while True:
            if at is not None and t >= at:
                return _deadline_end(service, result, n)
            candidates = plan.zones.select(candidates_all, t) if zoned else candidates_all
            ep = balancer.pick(candidates, tried, hash_key, t)
            if ep is None:
                ep = _fallback_pick(balancer, candidates, candidates_all, tried, hash_key, t)
                if ep is None:
                    return _all_blocked(service, result, n, candidates_all)
            key = ep.key
            # The common cases of HealthRegistry.admit / LoadStats.start / .finish /
            # HealthRegistry.record are inlined below on the endpoint's two slots (one dict
            # lookup each); anything else goes through those methods.
            hs = health_slots.get(key)
            if hs is not None and hs.state is CLOSED:
                admission = ADMIT
            else:
                admission = health.admit(ep, t)
                if admission == REJECT:
                    rejects += 1
                    if rejects > len(candidates_all):
                        return _all_refused(service, result, n)
                    continue
            # CallState.begin_attempt and RetryPolicy.attempt_timeout, inlined (hot path);
            # ``tried`` became a set when the retry was decided (below)
            n += 1
            if n > 1:
                tried.add(key)  # type: ignore[union-attr]
            if at is None:
                timeout = per_try
            else:
                timeout = at - t
                if per_try is not None and per_try < timeout:
                    timeout = per_try
            ls = load_slots.get(key)
            if ls is None:
                stats.start(ep, t)
            else:
                ls.in_flight += 1
            start = t
            action = _new(Attempt)  # Attempt(ep, timeout, n, dl) without the __init__ frame
            action.endpoint = ep
            action.timeout = timeout
            action.number = n
            action.deadline = dl
            try:
                result = yield action
            except BaseException:  # cancelled mid-attempt: free the trial slot and the load
                t = now()
                stats.finish(ep, start, t, False)
                _released(dest, observer, health.release(ep, admission, t))
                raise
            assert result is not None
            t = now()
            outcome = result.outcome
            if ls is None or stats.track_latency:
                stats.finish(ep, start, t, outcome is _SUCCESS)
            elif ls.in_flight > 0:
                ls.in_flight -= 1
            if (outcome is _SUCCESS and admission == ADMIT and hs is not None
                    and not (hs.ejecting or hs.failures or hs.c5xx or hs.cgw
                             or hs.skip_reported)):
                pass  # HealthRegistry.record: a healthy endpoint stays healthy, no events
            else:
                events = health.record(ep, outcome, admission, t)
                if events:
                    observer.health(events)
                    dest.on_health(events)
            if outcome is _SUCCESS:  # RetryPolicy.decide would say FINISH
                end = _new(CallEnd)  # CallEnd(result, n) without the __init__ frame
                end.result = result
                end.attempts = n
                end.failure = end.stopped = end.status = None
                end.message = ""
                return end
            if state is None:
                state = CallState(dl, idempotent, replayable, grpc)
            state.attempt = n
            d = retry.decide(state, outcome, result.status, result.retry_after_s, t,
                             grpc_code=result.grpc_code, pushback_s=result.pushback_s)
            if d is FINISH:
                return _ended(service, result, n, dl, t)
            if isinstance(d, Fail):
                observer.stopped(d.reason)
                return _ended(service, result, n, dl, t, d.reason)
            if n == 1:
                tried = state.tried = {key}  # the next pick avoids the endpoint that failed
            observer.retry(outcome.value)
            delay = cast(Retry, d).delay_s
            if delay > 0:
                yield Sleep(delay, "backoff")
                t = now()
    finally:
        if dest.debt:
            dest.release()
        else:
            tokens.append(None)  # DestinationState.release, inlined


def _run_hedged(
    dest: DestinationState,
    plan: Plan,
    state: CallState,
    candidates_all: tuple[Any, ...],
    hash_key: str | None,
    observer: CallObserver,
    t: float,
) -> HedgedCallGen:
    """The attempt loop of a hedged call (see "Hedging" in the module docstring).

    A *round* is a first attempt plus its hedges; it ends with a final result (the call
    ends), or with every copy failed retryably (the normal retry decision, then the next
    round). ``inflight`` maps each outstanding :class:`Attempt` to its endpoint, load start
    time and breaker admission; whatever is still in it when the generator ends (winner
    found, call failed, generator closed by a cancelled caller) is released without a
    health penalty."""
    now = dest.now
    service = dest.service
    health = dest.health
    stats = dest.stats
    balancer = plan.balancer
    zones = plan.zones
    retry = plan.retry
    max_extra = retry.hedging.max_extra
    delay = retry.hedging.delay_s
    inflight: dict[Attempt, tuple[Any, float, int]] = {}

    def start(ep: Any, admission: int, t: float) -> Attempt:
        state.begin_attempt(ep.key)
        a = _HedgedAttempt(ep, retry.attempt_timeout(state, t), state.attempt, state.deadline,
                           delay if state.hedges < max_extra else None)
        inflight[a] = (ep, stats.start(ep), admission)
        return a

    def hedge(t: float) -> Attempt | None:
        """One more copy to an untried endpoint, if allowed now; else None."""
        if state.hedges >= max_extra or state.deadline.expired(t):
            return None
        candidates = zones.select(candidates_all, t)
        ep = balancer.pick(candidates, state.tried, hash_key, t)
        if ep is None and candidates is not candidates_all:
            ep = balancer.pick(candidates_all, state.tried, hash_key, t)
        if ep is None:
            return None  # every usable endpoint is already working on this call
        admission = health.admit(ep, t)
        if admission == REJECT:
            return None
        if not retry.may_hedge(state, t):  # max_extra, deadline, retry budget (takes a token)
            _released(dest, observer, health.release(ep, admission, t))
            return None
        observer.retry(HEDGE_REASON)
        return start(ep, admission, t)

    result: AttemptResult | None = None
    rejects = 0
    try:
        while True:  # one round per iteration
            if state.deadline.expired(t):
                return _deadline_end(service, result, state.attempt)
            candidates = zones.select(candidates_all, t)
            ep = balancer.pick(candidates, state.tried, hash_key, t)
            if ep is None:
                ep = _fallback_pick(balancer, candidates, candidates_all, state.tried,
                                    hash_key, t)
                if ep is None:
                    return _all_blocked(service, result, state.attempt, candidates_all)
            admission = health.admit(ep, t)
            if admission == REJECT:
                rejects += 1
                if rejects > len(candidates_all):
                    return _all_refused(service, result, state.attempt)
                continue
            msg = yield start(ep, admission, t)
            while True:  # until this round's copies have all answered (or one won)
                if msg is HEDGE:
                    a = hedge(now())
                    msg = yield (WAIT if a is None else a)
                    continue
                if not isinstance(msg, Done):
                    raise TypeError(f"service {service!r}: hedged call plan expected Done or "
                                    f"HEDGE from the driver, got {msg!r}")
                ep, started, admission = inflight.pop(msg.attempt)
                result = msg.result
                t = now()
                outcome = result.outcome
                stats.finish(ep, started, t, outcome is Outcome.SUCCESS)
                events = health.record(ep, outcome, admission, t)
                if events:
                    observer.health(events)
                    dest.on_health(events)
                if outcome is Outcome.SUCCESS or not retry.is_retryable(
                        state, outcome, result.status, result.grpc_code):
                    end = _HedgedEnd(result, state.attempt)
                    end.cancelled = tuple(inflight)
                    return end
                if inflight:  # another copy may still answer: hedge now (gRPC A6) or wait
                    a = hedge(t)
                    msg = yield (WAIT if a is None else a)
                    continue
                break
            d = retry.decide(state, outcome, result.status, result.retry_after_s, t,
                             grpc_code=result.grpc_code, pushback_s=result.pushback_s)
            if isinstance(d, Fail):
                observer.stopped(d.reason)
                return _ended(service, result, state.attempt, state.deadline, t, d.reason)
            if not isinstance(d, Retry):  # FINISH (is_retryable said otherwise just above)
                return _ended(service, result, state.attempt, state.deadline, t)
            observer.retry(outcome.value)
            if d.delay_s > 0:
                yield Sleep(d.delay_s, "backoff")
            t = now()
    finally:
        if inflight:  # losers, or everything if the caller went away: no health penalty
            t = now()
            for ep, started, admission in inflight.values():
                stats.finish(ep, started, t, False)
                _released(dest, observer, health.release(ep, admission, t))
            inflight.clear()


def _ended(service: str, result: AttemptResult, attempts: int, deadline: Deadline, t: float,
           stopped: str | None = None) -> CallEnd:
    """The end of a call whose last attempt stands. A failed attempt without an HTTP status
    whose retry the deadline refused, or that got no answer at all (no gRPC status either)
    when the overall deadline had passed, ends the call as ``DEADLINE`` (the driver raises
    its deadline error); anything else returns the last result."""
    if result.status is None and result.outcome is not Outcome.SUCCESS and (
            stopped == "deadline_exceeded"
            or (result.grpc_code is None and deadline.expired(t))):
        return _deadline_end(service, result, attempts, stopped)
    return CallEnd(result, attempts, stopped=stopped)


def _deadline_end(service: str, result: AttemptResult | None, attempts: int,
                  stopped: str | None = None) -> CallEnd:
    return CallEnd(result, attempts, FailureKind.DEADLINE,
                   f"service {service!r}: deadline exceeded after {attempts} attempt(s)",
                   stopped=stopped)


def _released(dest: DestinationState, observer: CallObserver,
              events: tuple[HealthEvent, ...]) -> None:
    if events:
        observer.health(events)
        dest.on_health(events)


def _fallback_pick(balancer: Any, candidates: tuple[Any, ...], candidates_all: tuple[Any, ...],
                   tried: set[str] | frozenset[str], hash_key: str | None, t: float) -> Any:
    """When the first pick found nothing: an untried endpoint in another zone beats
    retrying a failed local one; then reusing a tried endpoint beats failing."""
    ep = None
    if candidates is not candidates_all:
        ep = balancer.pick(candidates_all, tried, hash_key, t)
    if ep is None and tried:
        ep = balancer.pick(candidates, _EMPTY, hash_key, t)
    if ep is None and candidates is not candidates_all:
        ep = balancer.pick(candidates_all, _EMPTY, hash_key, t)
    return ep


def _all_blocked(service: str, result: AttemptResult | None, attempts: int,
                 candidates_all: tuple[Any, ...]) -> CallEnd:
    return CallEnd(result, attempts, FailureKind.CIRCUIT_OPEN,
                   f"service {service!r}: all {len(candidates_all)} endpoint(s) "
                   "are ejected or have an open circuit breaker")


def _all_refused(service: str, result: AttemptResult | None, attempts: int) -> CallEnd:
    return CallEnd(result, attempts, FailureKind.CIRCUIT_OPEN,
                   f"service {service!r}: circuit breakers refused every endpoint")


def _no_header(_name: str) -> str | None:
    return None


def _hash_key(src: tuple[str, str], lookup: Callable[[str], str | None]) -> str | None:
    kind, name = src
    if kind == "header":
        return lookup(name)
    cookies = lookup("cookie")
    if not cookies:
        return None
    for part in cookies.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None
