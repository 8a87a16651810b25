"""Differential test: the call plan against a reference built from the home methods.

``run_call`` is the hot path of every call; the rule of docs/design.md ("the inlining rule")
allows it to restate a rule of another module for speed only when a test holds the copy to
the original. This is that test, kept even while ``run_call`` calls every home method (so a
shortcut added later is caught at once): random scripts of outcomes (seeded, many scripts,
several policies) are run through ``run_call`` and through :func:`reference_call`, a plain
loop written only with ``DestinationState.acquire`` / ``release``,
``HealthRegistry.admit`` / ``record``, ``LoadStats.start`` / ``finish``, ``RetryPolicy.new_call`` (``CallState``, the budget's ``deposit``) and
``RetryPolicy.decide`` (the budget's ``try_withdraw``). Both sides start from identical
destinations (same seed, same clock) and must pick the same endpoints, end the same way and
leave identical health, load and budget state while every attempt runs and after every call.

The shortcuts ``run_call`` keeps for the common case (docs/design.md 9: S1 admission of a
closed breaker, S2 load counts without latency tracking, S3 an admitted success on a quiet
slot; S4 the first pick, S5 the token deque for ``acquire`` / ``release``, including a
slot that became debt, S6 the lazy ``CallState`` and the inlined ``Deadline`` reads) are each
exercised here in both directions: policies with and without breakers and latency tracking (``peak_ewma``), HTTP and
gRPC calls (``grpc=True``: every status retried on ``grpc_retry_on``, committed results,
pushback), one endpoint and four, with and without a caller's deadline.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from plan_fakes import Clock

from meshlib.config.policy import parse_policy_dict
from meshlib.core.call import Attempt, AttemptResult, CallEnd, Sleep, run_call
from meshlib.core.deadline import Deadline
from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.core.health import REJECT
from meshlib.core.outcome import Outcome
from meshlib.core.retry import FINISH, Fail
from meshlib.core.steps import fallback_pick

SVC = "diff"
RESULTS = [
    AttemptResult(Outcome.SUCCESS, 200, "ok"),
    AttemptResult(Outcome.SUCCESS, 200, "ok"),
    AttemptResult(Outcome.SUCCESS, 200, "ok"),
    AttemptResult(Outcome.GATEWAY_ERROR, 503, "busy"),
    AttemptResult(Outcome.GATEWAY_ERROR, 503, "busy", retry_after_s=0.01),
    AttemptResult(Outcome.HTTP_5XX, 500, "boom"),
    AttemptResult(Outcome.HTTP_4XX, 404, "missing"),
    AttemptResult(Outcome.CONNECT_FAILURE, None, "refused"),
    AttemptResult(Outcome.RESET, None, "reset"),
    AttemptResult(Outcome.TIMEOUT, None, "slow"),
]

#: gRPC attempts as ``meshlib.grpc.attempt`` reports them (``grpc_code`` None: committed).
GRPC_RESULTS = [
    AttemptResult(Outcome.SUCCESS, 200, None, grpc_code="OK"),
    AttemptResult(Outcome.SUCCESS, 200, None, grpc_code="OK"),
    AttemptResult(Outcome.SUCCESS, 200, None, grpc_code="OK"),
    AttemptResult(Outcome.GATEWAY_ERROR, 503, "unavailable", grpc_code="UNAVAILABLE"),
    AttemptResult(Outcome.GATEWAY_ERROR, 503, "unavailable", grpc_code="UNAVAILABLE",
                  pushback_s=0.01),
    AttemptResult(Outcome.HTTP_5XX, 500, "internal", grpc_code="INTERNAL"),
    AttemptResult(Outcome.HTTP_4XX, 404, "not found", grpc_code="NOT_FOUND"),
    AttemptResult(Outcome.TIMEOUT, 504, "deadline", grpc_code="DEADLINE_EXCEEDED"),
    AttemptResult(Outcome.GATEWAY_ERROR, 503, "committed"),  # headers came: never retried
    AttemptResult(Outcome.CONNECT_FAILURE, None, "refused"),
]

POLICIES: list[dict[str, Any]] = [
    {},
    {"load_balancer": {"policy": "round_robin"},
     "circuit_breaker": {"failure_threshold": 2, "reset_timeout": "200ms"},
     "outlier_detection": {"consecutive_5xx": 2, "max_ejection_percent": 100,
                           "base_ejection_time": "300ms"}},
    {"load_balancer": {"policy": "peak_ewma"}, "retries": {"attempts": 4},
     "circuit_breaker": {"failure_threshold": 1, "reset_timeout": "50ms",
                         "half_open_max_calls": 2},
     "outlier_detection": {"consecutive_gateway_failure": 1, "max_ejection_percent": 50,
                           "always_eject_one_host": True, "base_ejection_time": "100ms"}},
    {"load_balancer": {"policy": "random"}, "timeout": "150ms",
     "retries": {"attempts": 5, "per_try_timeout": "50ms",
                 "retry_on": ["5xx", "reset", "connect-failure"],
                 "budget": {"percent": 10, "min_retries_per_second": 1, "window": "1s"}},
     "circuit_breaker": {"enabled": False}},
    {"retries": {"attempts": 3, "methods": ["PUT"]},  # GET is not retried: Fail reasons
     "outlier_detection": {"enabled": False}},
    {"load_balancer": {"policy": "peak_ewma"}, "timeout": "80ms",  # latency tracked (S2)
     "retries": {"attempts": 3, "grpc_retry_on": ["unavailable", "internal"]},
     "circuit_breaker": {"enabled": False},
     "outlier_detection": {"consecutive_5xx": 3, "max_ejection_percent": 100}},
    {"circuit_breaker": {"failure_threshold": 1, "reset_timeout": "30ms",  # quiet trials:
                         "half_open_max_calls": 1},  # half-open slots with no counters
     "outlier_detection": {"enabled": False}},
]

#: (grpc, endpoints, caller deadline in seconds or None)
MODES = [(False, 4, None), (True, 4, None), (False, 1, None), (True, 1, 0.06)]


def _dest(raw: dict[str, Any], seed: int, count: int = 4) -> tuple[DestinationState, Clock]:
    eps = tuple(Endpoint(SVC, f"i{i}", "127.0.0.1", 9000 + i, key=f"/svc/{SVC}/i{i}")
                for i in range(count))
    snap = ServiceSnapshot(SVC, eps, parse_policy_dict(raw, "diff"))
    clock = Clock()
    dest = DestinationState(SVC, lambda: snap, now=clock, rng=random.Random(seed))
    dest.plan()
    return dest, clock


#: an attempt that takes exactly its timeout (a real timeout; lands on the deadline itself)
WHOLE = -1.0


class Script:
    """The outcomes and durations of one call's attempts, drawn once and replayed on both
    sides (attempt ``n`` gets the same result and takes the same time on each)."""

    def __init__(self, rng: random.Random, grpc: bool = False,
                 caller_timeout: float | None = None) -> None:
        results = GRPC_RESULTS if grpc else RESULTS
        self.steps = [(rng.choice(results), rng.choice((0.0, 0.001, 0.02, 0.07, WHOLE)))
                      for _ in range(6)]
        self.gap = rng.choice((0.0, 0.005, 0.05, 0.3))  # time before the call starts
        self.grpc = grpc
        self.caller_timeout = caller_timeout
        #: the concurrency limit drops to 0 during the first attempt (a policy change): the
        #: call's slot becomes debt, which its release pays back (DestinationState.release)
        self.shrink = rng.random() < 0.2

    def deadline(self, now: float) -> Deadline | None:
        """The caller's deadline (a gRPC ``timeout``), the same object on both sides."""
        return None if self.caller_timeout is None else Deadline(now + self.caller_timeout)

    def answer(self, n: int, timeout: float | None) -> tuple[AttemptResult, float]:
        result, took = self.steps[min(n, len(self.steps)) - 1]
        if took == WHOLE:
            took = 0.07 if timeout is None else timeout
        return result, took


def during(dest: DestinationState, key: str, timeout: float | None) -> tuple[Any, ...]:
    """What an attempt sees while it runs: its endpoint and timeout, and the whole state."""
    return key, timeout, state_of(dest)


def drive(dest: DestinationState, clock: Clock, script: Script) -> tuple[CallEnd, list[Any]]:
    """Run ``run_call`` as a driver does: answer each Attempt from the script."""
    gen = run_call(dest, dest.plan(), method="POST" if script.grpc else "GET",
                   grpc=script.grpc, deadline=script.deadline(clock()))
    picks: list[Any] = []
    try:
        action = next(gen)
        while True:
            if isinstance(action, Sleep):
                clock.advance(action.seconds)
                action = gen.send(None)
                continue
            assert isinstance(action, Attempt)
            picks.append(during(dest, action.endpoint.key, action.timeout))
            if action.number == 1 and script.shrink:
                dest.set_limit(0)
            result, took = script.answer(action.number, action.timeout)
            clock.advance(took)
            action = gen.send(result)
    except StopIteration as stop:
        return stop.value, picks


def reference_call(dest: DestinationState, clock: Clock,
                   script: Script) -> tuple[tuple[str | None, int, str | None], list[Any]]:
    """The same call written only with the home methods, in their documented order."""
    assert dest.acquire()  # the concurrency slot (Envoy max_requests)
    try:
        return _reference_loop(dest, clock, script)
    finally:
        dest.release()


def _reference_loop(dest: DestinationState, clock: Clock,
                    script: Script) -> tuple[tuple[str | None, int, str | None], list[Any]]:
    plan = dest.plan()
    health, stats, retry, balancer = dest.health, dest.stats, plan.retry, plan.balancer
    candidates_all = plan.router.default.endpoints
    t = clock()
    state = retry.new_call("POST" if script.grpc else "GET", grpc=script.grpc, now=t,
                           deadline=script.deadline(t))  # CallState; deposits into the budget
    picks: list[Any] = []
    result: AttemptResult | None = None
    rejects = 0
    while True:
        if state.deadline.expired(t):
            return ("deadline_exceeded", state.attempt, None), picks
        candidates = plan.zones.select(candidates_all, t)
        ep = balancer.pick(candidates, state.tried, None, t)
        if ep is None:
            ep = fallback_pick(balancer, candidates, candidates_all, state.tried, None, t)
            if ep is None:
                return ("circuit_open", state.attempt, None), picks
        admission = health.admit(ep, t)
        if admission == REJECT:
            rejects += 1
            if rejects > len(candidates_all):
                return ("circuit_open", state.attempt, None), picks
            continue
        rejects = 0  # the bound on refusals is per attempt
        state.begin_attempt(ep.key)
        start = stats.start(ep, t)
        timeout = retry.attempt_timeout(state, t)
        picks.append(during(dest, ep.key, timeout))
        if state.attempt == 1 and script.shrink:
            dest.set_limit(0)
        result, took = script.answer(state.attempt, timeout)
        clock.advance(took)
        t = clock()
        stats.finish(ep, start, t, result.outcome is Outcome.SUCCESS)
        health.record(ep, result.outcome, admission, t)
        d = retry.decide(state, result.outcome, result.status, result.retry_after_s, t,
                         grpc_code=result.grpc_code, pushback_s=result.pushback_s)
        if d is FINISH or isinstance(d, Fail):
            stopped = d.reason if isinstance(d, Fail) else None
            deadline_end = result.status is None and result.outcome is not Outcome.SUCCESS and (
                stopped == "deadline_exceeded"
                or (result.grpc_code is None and state.deadline.expired(t)))
            return ("deadline_exceeded" if deadline_end else None, state.attempt,
                    stopped), picks
        if d.delay_s > 0:
            clock.advance(d.delay_s)
            t = clock()


def state_of(dest: DestinationState) -> dict[str, Any]:
    """Everything the calls leave behind: health slots, load slots, the retry budget."""
    health = {
        k: tuple(getattr(s, f) for f in s.__slots__ if f != "lock")
        for k, s in sorted(dest.health.slots.items())
    }
    load = {k: (s.in_flight, s.ewma, s.stamp) for k, s in sorted(dest.stats.slots.items())}
    b = dest.plan().retry.budget
    assert b is not None
    budget = (tuple(b._dep), tuple(b._wd), b.current - b._folded, b._cur)
    return {"health": health, "load": load, "budget": budget,
            "inflight": dest.inflight, "tokens": len(dest.tokens), "debt": dest.debt}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"grpc={m[0]}-eps={m[1]}-dl={m[2]}")
@pytest.mark.parametrize("policy_index", range(len(POLICIES)))
@pytest.mark.parametrize("seed", range(8))
def test_run_call_leaves_the_state_the_home_methods_leave(
        policy_index: int, seed: int, mode: tuple[bool, int, float | None]):
    grpc, count, caller_timeout = mode
    raw = POLICIES[policy_index]
    plan_dest, plan_clock = _dest(raw, seed, count)
    ref_dest, ref_clock = _dest(raw, seed, count)
    scripts = random.Random(1000 * policy_index + seed)
    for i in range(60):  # one script = one call; 60 calls per destination
        script = Script(scripts, grpc, caller_timeout)
        plan_clock.advance(script.gap)
        ref_clock.advance(script.gap)
        end, picks = drive(plan_dest, plan_clock, script)
        ref_end, ref_picks = reference_call(ref_dest, ref_clock, script)
        where = f"policy {policy_index}, seed {seed}, call {i}"
        assert picks == ref_picks, where
        assert (end.failure, end.attempts, end.stopped) == ref_end, where
        assert plan_clock.t == ref_clock.t, where
        assert state_of(plan_dest) == state_of(ref_dest), where
        if script.shrink:  # the policy's limit again, on both sides
            plan_dest.set_limit(plan_dest.plan().max_requests)
            ref_dest.set_limit(ref_dest.plan().max_requests)
