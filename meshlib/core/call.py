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
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Final

from meshlib.core.deadline import Deadline
from meshlib.core.destination import DestinationState, Plan
from meshlib.core.health import REJECT, HealthEvent
from meshlib.core.outcome import Outcome
from meshlib.core.retry import FINISH, Fail

_EMPTY: frozenset[str] = frozenset()


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
    propagated timeout header)."""

    __slots__ = ("endpoint", "timeout", "number", "deadline")

    def __init__(self, endpoint: Any, timeout: float | None, number: int, deadline: Deadline):
        self.endpoint = endpoint
        self.timeout = timeout
        self.number = number
        self.deadline = deadline


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


class CallEnd:
    """How the call ended: the last attempt's ``result`` (None if no attempt was made),
    a mesh ``failure`` kind with ``message`` (None when the last result stands), the
    reason a wanted retry was refused (``stopped``), and ``attempts`` made."""

    __slots__ = ("result", "failure", "message", "stopped", "attempts", "status")

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


class CallObserver:
    """Hooks for telemetry; the default does nothing. Drivers pass a recorder."""

    def retry(self, reason: str) -> None:
        """A retry was decided after an attempt that ended with ``reason`` (outcome name)."""

    def stopped(self, reason: str) -> None:
        """A retry was wanted but refused (``FailReason``)."""

    def health(self, events: tuple[HealthEvent, ...]) -> None:
        """Breaker / outlier state changes."""


NULL_OBSERVER: Final = CallObserver()

Action = Attempt | Sleep
CallGen = Generator[Action, "AttemptResult | None", CallEnd]


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
    rng = dest.rng
    now = dest.now
    service = dest.service

    faults = plan.faults
    if faults.active:
        delay, abort = faults.decide_grpc(rng) if grpc else faults.decide(rng)
        if delay:
            yield Sleep(delay, "fault_delay")
        if abort is not None:
            return CallEnd(None, 0, FailureKind.FAULT_ABORT,
                           f"service {service!r}: request aborted by fault injection policy",
                           status=abort)

    snap_eps = plan.router.endpoints
    if not snap_eps:
        return CallEnd(None, 0, FailureKind.NO_ENDPOINTS,
                       f"service {service!r} has no endpoints in etcd")
    if not dest.acquire(plan.max_requests):
        return CallEnd(None, 0, FailureKind.CONCURRENCY,
                       f"service {service!r}: concurrency limit reached "
                       f"({plan.max_requests} requests in flight)")
    try:
        lookup = header if header is not None else _no_header
        if plan.has_header_routes:
            target = plan.router.resolve(method, path, lookup, rng)
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
        idem_key = (
            has_idempotency_key() if has_idempotency_key is not None and not grpc
            and method not in plan.retry.methods else False
        )
        state = plan.retry.new_call(method, has_idempotency_key=idem_key, replayable=replayable,
                                    grpc=grpc, now=t, deadline=deadline)
        result: AttemptResult | None = None
        health = dest.health
        stats = dest.stats
        balancer = plan.balancer
        rejects = 0
        while True:
            if state.deadline.expired(t):
                return CallEnd(result, state.attempt, FailureKind.DEADLINE,
                               f"service {service!r}: deadline exceeded after "
                               f"{state.attempt} attempt(s)")
            candidates = plan.zones.select(candidates_all, t)
            ep = balancer.pick(candidates, state.tried, hash_key, t)
            if ep is None and candidates is not candidates_all:
                # an untried endpoint in another zone beats retrying a failed local one
                ep = balancer.pick(candidates_all, state.tried, hash_key, t)
            if ep is None and state.tried:
                ep = balancer.pick(candidates, _EMPTY, hash_key, t)  # reuse beats failing
            if ep is None and candidates is not candidates_all:
                ep = balancer.pick(candidates_all, _EMPTY, hash_key, t)
            if ep is None:
                return CallEnd(result, state.attempt, FailureKind.CIRCUIT_OPEN,
                               f"service {service!r}: all {len(candidates_all)} endpoint(s) "
                               "are ejected or have an open circuit breaker")
            admission = health.admit(ep, t)
            if admission == REJECT:
                rejects += 1
                if rejects > len(candidates_all):
                    return CallEnd(result, state.attempt, FailureKind.CIRCUIT_OPEN,
                                   f"service {service!r}: circuit breakers refused every "
                                   "endpoint")
                continue
            state.begin_attempt(ep.key)
            start = stats.start(ep)
            try:
                result = yield Attempt(ep, plan.retry.attempt_timeout(state, t),
                                       state.attempt, state.deadline)
            except BaseException:  # cancelled mid-attempt: free the trial slot and the load
                t = now()
                stats.finish(ep, start, t, False)
                health.release(ep, admission, t)
                raise
            assert result is not None
            t = now()
            outcome = result.outcome
            stats.finish(ep, start, t, outcome is Outcome.SUCCESS)
            events = health.record(ep, outcome, admission, t)
            if events:
                observer.health(events)
                dest.on_health(events)
            d = plan.retry.decide(state, outcome, result.status, result.retry_after_s, t,
                                  grpc_code=result.grpc_code, pushback_s=result.pushback_s)
            if d is FINISH:
                return CallEnd(result, state.attempt)
            if isinstance(d, Fail):
                observer.stopped(d.reason)
                if d.reason == "deadline_exceeded" and result.status is None:
                    return CallEnd(result, state.attempt, FailureKind.DEADLINE,
                                   f"service {service!r}: deadline exceeded after "
                                   f"{state.attempt} attempt(s)", stopped=d.reason)
                return CallEnd(result, state.attempt, stopped=d.reason)
            observer.retry(outcome.value)
            if d.delay_s > 0:
                yield Sleep(d.delay_s, "backoff")
                t = now()
    finally:
        dest.release()


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
