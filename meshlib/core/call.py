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

Hedging (Envoy request hedging, gRPC A6 hedging policy, Finagle backup requests) runs
in its own loop, :func:`meshlib.core.hedged.run_hedged`, entered from here at the first
attempt when ``retries.hedging.enabled``, the call is idempotent with a replayable body, it
is not a gRPC call (``grpc=True`` never hedges) and the target has at least two endpoints;
its protocol is described there. The values exchanged live in :mod:`meshlib.core.actions`
(re-exported here: drivers import them from this module).

One source for every rule: the loop below calls the home method of every decision
(``HealthRegistry.admit`` / ``record``, ``LoadStats.start`` / ``finish``,
``CallState.begin_attempt``, ``Deadline.per_try``, ``RetryPolicy.decide_after``,
``DestinationState.acquire`` / ``release``, :func:`meshlib.core.steps.choose`), except in
six shortcuts of the common case (one attempt that succeeds), marked S1-S6 below and in
``steps.choose``: S1 a closed breaker admits, S2 load counts without latency tracking, S3 an
admitted success on a quiet slot records nothing and finishes, S4 the first pick made here
(``steps.choose_after`` continues anything else), S5 the concurrency token taken and returned
on the deque itself, S6 the ``CallState`` made only when a first attempt fails, with
``Deadline.per_try`` read inline. Code after a real network wait runs with cold caches,
where each function and object on the path costs several times its warm price: S1-S3 save
~0.4 us of a ~2.3 us warm plan, S4-S6 ~0.3 us more, ~1-1.5 % of a local gRPC call in
``bench/grpc_overhead.py`` together (``bench/grpc_cold.py`` measures the plan's cold cost
directly). ``tests/unit/test_core_call_differential.py`` holds each to its home method
(docs/design.md, sections 9 and 14, "the inlining rule").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from meshlib.core.actions import (
    HEDGE,
    HEDGE_REASON,
    NULL_OBSERVER,
    WAIT,
    Action,
    Attempt,
    AttemptResult,
    CallEnd,
    CallGen,
    CallObserver,
    Done,
    FailureKind,
    HedgedCallGen,
    Sleep,
    deadline_end,
    ended,
    unusable_end,
)
from meshlib.core.deadline import Deadline
from meshlib.core.destination import DestinationState, Plan
from meshlib.core.health import ADMIT, CLOSED
from meshlib.core.hedged import run_hedged
from meshlib.core.outcome import Outcome
from meshlib.core.retry import _NONE_TRIED, FINISH, CallState, Fail, Retry, is_idempotent
from meshlib.core.steps import choose_after, report

__all__ = [
    "HEDGE",
    "HEDGE_REASON",
    "NULL_OBSERVER",
    "WAIT",
    "Action",
    "Attempt",
    "AttemptResult",
    "CallEnd",
    "CallGen",
    "CallObserver",
    "Done",
    "FailureKind",
    "HedgedCallGen",
    "Sleep",
    "no_endpoints_message",
    "run_call",
]

_SUCCESS = Outcome.SUCCESS


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
        return CallEnd(None, 0, FailureKind.NO_ENDPOINTS, no_endpoints_message(dest, plan))
    # Shortcut S5 (docs/design.md 9): DestinationState.acquire / release as the token
    # deque's pop / append (release's debt path still goes through release()).
    tokens = dest.tokens
    try:
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
        dl = retry.deposit_and_deadline(t, deadline)
        if plan.hedging and not grpc and idempotent and replayable and len(candidates_all) > 1:
            hedged = CallState(dl, idempotent, replayable, grpc)
            return (yield from cast(CallGen, run_hedged(dest, plan, hedged, candidates_all,
                                                        hash_key, observer, t)))
        # The plain attempt loop: pick, admit, attempt, record, decide.
        health = dest.health
        stats = dest.stats
        health_slots = health.slots
        load_slots = stats.slots
        per_try = retry.per_try_timeout  # RetryPolicy.attempt_timeout is dl.per_try(t, this)
        at = dl.at
        balancer = plan.balancer
        zoned = plan.zoned
        result: AttemptResult | None = None
        # Shortcut S6 (docs/design.md 9): the CallState is made when a first attempt fails
        # (RetryPolicy.decide_after needs it); until then the attempt count is local and
        # ``tried`` the shared empty set, what CallState.begin_attempt would hold.
        state: CallState | None = None
        tried: set[str] | frozenset[str] = _NONE_TRIED
        n = 0
        while True:
            if dl.expired(t):
                return deadline_end(service, result, n)
            # Shortcut S4: steps.choose's first pick, with S1 on its endpoint; anything
            # else (no pick, a breaker not closed) continues in steps.choose_after.
            candidates = plan.zones.select(candidates_all, t) if zoned else candidates_all
            ep: Any = balancer.pick(candidates, tried, hash_key, t)
            hs = health_slots.get(ep.key) if ep is not None else None
            if hs is not None and hs.state is CLOSED:
                admission = ADMIT
            else:
                ep, admission = choose_after(plan, health, candidates_all, tried, hash_key, t,
                                             ep, candidates)
                if ep is None:
                    return unusable_end(service, result, n, len(candidates_all), admission)
            key = ep.key
            n += 1
            if state is not None:
                state.begin_attempt(key)
            # S6: Deadline.per_try, min(per_try_timeout, remaining)
            if at is None:
                timeout = per_try
            else:
                timeout = at - t
                if per_try is not None and per_try < timeout:
                    timeout = per_try
            # Shortcut S2 (docs/design.md 9): LoadStats.start without its frame when no
            # balancer reads latency; held to LoadStats by test_core_call_differential.py.
            ls = load_slots.get(key)
            if ls is None or stats.track_latency:
                start = stats.start(ep, t)
            else:
                ls.in_flight += 1
                start = t
            try:
                result = yield Attempt(ep, timeout, n, dl)
            except BaseException:  # cancelled mid-attempt: free the trial slot and the load
                t = now()
                stats.finish(ep, start, t, False)
                report(dest, observer, health.release(ep, admission, t))
                raise
            assert result is not None
            t = now()
            outcome = result.outcome
            if ls is None or stats.track_latency:  # S2: LoadStats.finish
                stats.finish(ep, start, t, outcome is _SUCCESS)
            elif ls.in_flight > 0:
                ls.in_flight -= 1
            if outcome is _SUCCESS:
                # Shortcut S3: an admitted success on a quiet slot changes no health state
                # (HealthRegistry.record's own first test, on the flag its writers keep
                # current), and RetryPolicy.decide finishes a success (actions.ended keeps
                # its result). Held to the home methods by test_core_call_differential.py.
                hs = health_slots.get(key)
                if admission != ADMIT or hs is None or not hs.quiet:
                    events = health.record(ep, outcome, admission, t)
                    if events:
                        report(dest, observer, events)
                return CallEnd(result, n)
            events = health.record(ep, outcome, admission, t)
            if events:
                report(dest, observer, events)
            if state is None:  # S6: the state begin_attempt would have built
                state = CallState(dl, idempotent, replayable, grpc)
                state.attempt = n
                tried = state.tried = {key}
            d = retry.decide_after(state, result, t)
            if d is FINISH:
                return ended(service, result, n, dl, t)
            if isinstance(d, Fail):
                observer.stopped(d.reason)
                return ended(service, result, n, dl, t, d.reason)
            observer.retry(outcome.value)
            delay = cast(Retry, d).delay_s
            if delay > 0:
                yield Sleep(delay, "backoff")
                t = now()
    finally:
        if dest.debt:  # S5: DestinationState.release
            dest.release()
        else:
            tokens.append(None)


def no_endpoints_message(dest: DestinationState, plan: Plan) -> str:
    """Why a service has no endpoints, as the caller should read it: empty in etcd, or etcd
    not reachable (and since when) with nothing cached, from the destination's view of
    discovery (:attr:`DestinationState.discovery`)."""
    service = dest.service
    snap = plan.snapshot
    disc = dest.discovery
    if disc is None or disc.connected:
        return f"service {service!r} has no endpoints in etcd"
    last = disc.last_contact
    if last is None:
        down = "etcd has not answered since the mesh started"
    else:
        down = f"etcd unreachable for {max(0.0, dest.now() - last):.1f}s"
    if snap.revision == 0 and not snap.from_cache:
        return (f"service {service!r}: no endpoints known: {down} and no snapshot of "
                "the service is cached (Mesh(snapshot_path=...) keeps one across restarts)")
    source = "the cached snapshot" if snap.from_cache else f"etcd revision {snap.revision}"
    return (f"service {service!r} had no endpoints in {source}; {down}, so this may be "
            "out of date")


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
