"""The plain (non-hedged) call plan of ``meshlib.core.call.run_call``, driven by hand.

No I/O, no event loop, no threads: a fake clock, a seeded RNG, a ``DestinationState`` over a
fixed snapshot, and :func:`drive`, a sans-I/O driver that answers every :class:`Attempt` from
a script (by attempt number, else by endpoint instance id, else ``"*"``) and advances the
fake clock by every :class:`Sleep`, exactly as the sync and async drivers do with real I/O.
The order of decisions under test is Envoy's router (fault filter, ``max_requests``, route
and subset, zone, balancer, breaker, per-try timeout, retry decision; see the module
docstring of :mod:`meshlib.core.call`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Mapping
from typing import Any

import pytest
from plan_fakes import Clock, Recorder

from meshlib.config.policy import merge_policy_dicts, parse_policy_dict
from meshlib.core.call import (
    Attempt,
    AttemptResult,
    CallEnd,
    FailureKind,
    Sleep,
    run_call,
)
from meshlib.core.deadline import Deadline
from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.core.health import HALF_OPEN, REJECT, EventKind
from meshlib.core.outcome import Outcome, classify_grpc, grpc_status_for_http

SVC = "orders"
OK = AttemptResult(Outcome.SUCCESS, 200, "ok")
R503 = AttemptResult(Outcome.GATEWAY_ERROR, 503, "busy")
R404 = AttemptResult(Outcome.HTTP_4XX, 404, "missing")
CONNECT = AttemptResult(Outcome.CONNECT_FAILURE, None, "connection refused")
TIMEOUT = AttemptResult(Outcome.TIMEOUT, None, "per-try timeout")
#: Script elapsed-time marker: the attempt lasts exactly its own ``timeout``.
FULL = "timeout"

#: Every test's policy is this, deep-merged with the test's own fields: short backoff, and
#: no outlier ejection unless a test turns it on (so failures only trip what a test wants).
BASE: dict[str, Any] = {
    "retries": {"backoff": {"base": "10ms", "max": "40ms"}},
    "outlier_detection": {"enabled": False},
}


def r503(retry_after: float) -> AttemptResult:
    return AttemptResult(Outcome.GATEWAY_ERROR, 503, "busy", retry_after_s=retry_after)


def grpc_result(name: str, pushback: float | None = None) -> AttemptResult:
    """What ``meshlib.grpc.attempt.result_from_error`` reports for an uncommitted status."""
    return AttemptResult(classify_grpc(name), grpc_status_for_http(name), name,
                         pushback_s=pushback, grpc_code=name)


G_OK = AttemptResult(Outcome.SUCCESS, 200, "ok", grpc_code="OK")


def ep(i: int, zone: str | None = None, **labels: str) -> Endpoint:
    return Endpoint(SVC, f"i{i}", "127.0.0.1", 9000 + i, zone=zone, labels=labels,
                    key=f"/svc/{SVC}/i{i}")


def make_dest(raw: dict[str, Any] | None = None, endpoints: int | tuple[Endpoint, ...] = 3, *,
              zone: str | None = None, seed: int = 7) -> tuple[DestinationState, Clock]:
    eps = endpoints if isinstance(endpoints, tuple) else tuple(ep(i) for i in range(endpoints))
    policy = parse_policy_dict(merge_policy_dicts(BASE, raw), "test")
    snap = ServiceSnapshot(SVC, eps, policy)
    clock = Clock()
    dest = DestinationState(SVC, lambda: snap, zone=zone, now=clock, rng=random.Random(seed))
    dest.plan()  # configures breakers, outlier detection and load stats from the policy
    return dest, clock


Answer = AttemptResult | tuple[AttemptResult, float | str]
Script = Mapping[int | str, Answer]
Action = Attempt | Sleep


def _answer(script: Script, a: Attempt) -> tuple[AttemptResult, float]:
    for k in (a.number, a.endpoint.instance_id, "*"):
        if k in script:
            ans = script[k]
            break
    else:
        pytest.fail(f"the script has no answer for {a!r}")
    if isinstance(ans, AttemptResult):
        return ans, 0.0
    result, elapsed = ans
    if elapsed == FULL:
        assert a.timeout is not None, f"{a!r} has no timeout to last"
        return result, float(a.timeout)
    return result, float(elapsed)


def drive(gen: Generator[Action, AttemptResult | None, CallEnd], script: Script, clock: Clock,
          times: list[float] | None = None) -> tuple[CallEnd, list[Action]]:
    """Run one plain call to its end: answer attempts from ``script`` (after advancing the
    clock by the answer's elapsed time), sleep on the fake clock. Returns the ``CallEnd``
    and every action yielded; ``times`` (optional) receives the clock at each action."""
    actions: list[Action] = []
    try:
        action = next(gen)
        while True:
            assert len(actions) < 50, f"runaway call plan: {actions!r}"
            actions.append(action)
            if times is not None:
                times.append(clock())
            if isinstance(action, Sleep):
                assert action.seconds >= 0, action.seconds
                clock.advance(action.seconds)
                action = gen.send(None)
                continue
            assert type(action) is Attempt and action.hedge_after is None, action  # plain mode
            result, elapsed = _answer(script, action)
            clock.advance(elapsed)
            action = gen.send(result)
    except StopIteration as stop:
        return stop.value, actions


def call(dest: DestinationState, clock: Clock, script: Script, method: str = "GET", *,
         obs: Recorder | None = None, times: list[float] | None = None,
         **kw: Any) -> tuple[CallEnd, list[Action], Recorder]:
    obs = obs or Recorder()
    gen = run_call(dest, dest.plan(), method=method, observer=obs, **kw)
    end, actions = drive(gen, script, clock, times)
    return end, actions, obs


def trace(actions: list[Action]) -> str:
    return " ".join("A" if isinstance(a, Attempt) else f"S:{a.reason}" for a in actions)


def attempts(actions: list[Action]) -> list[Attempt]:
    return [a for a in actions if isinstance(a, Attempt)]


def sleeps(actions: list[Action]) -> list[Sleep]:
    return [a for a in actions if isinstance(a, Sleep)]


def names(actions: list[Action]) -> list[str]:
    return [a.endpoint.instance_id for a in attempts(actions)]


def assert_released(dest: DestinationState) -> None:
    """No call slot and no endpoint load is left behind."""
    assert dest.inflight == 0
    loads = {k: dest.stats.slot(k).in_flight for k in sorted(dest.stats.keys())}
    assert loads == dict.fromkeys(loads, 0)


# --------------------------------------------------------------------------- the plan table

FAULT_ABORT = FailureKind.FAULT_ABORT
NO_EPS = FailureKind.NO_ENDPOINTS
EMPTY_SUBSET = {
    "subsets": {"canary": {"labels": {"version": "v9"}}},
    "routes": [{"name": "all-to-canary", "split": [{"subset": "canary", "weight": 1}]}],
}
NO_BUDGET = {"retries": {"budget": {"percent": 0, "min_retries_per_second": 0}}}
POST_KEY = {"retries": {"allow_post_with_idempotency_key": True}}
GRPC = {"grpc": True}


def _has_key() -> bool:
    return True


@pytest.mark.parametrize(
    ("raw", "n", "method", "kw", "script", "want"),
    [
        pytest.param({}, 3, "GET", {}, {1: OK}, {"trace": "A"}, id="success first try"),
        pytest.param({"fault": {"abort": {"percent": 100, "http_status": 429}}}, 3, "GET", {},
                     {}, {"trace": "", "failure": FAULT_ABORT, "status": 429},
                     id="fault abort: HTTP status"),
        pytest.param({"fault": {"abort": {"percent": 100, "grpc_status": "RESOURCE_EXHAUSTED"}}},
                     3, "POST", GRPC, {},
                     {"trace": "", "failure": FAULT_ABORT, "status": "resource-exhausted"},
                     id="fault abort: gRPC status name"),
        pytest.param({"fault": {"delay": {"percent": 100, "duration": "250ms"}}}, 3, "GET", {},
                     {1: OK}, {"trace": "S:fault_delay A"}, id="fault delay, then the call"),
        pytest.param({"fault": {"delay": {"percent": 100, "duration": "250ms"},
                                "abort": {"percent": 100}}}, 3, "GET", {}, {},
                     {"trace": "S:fault_delay", "failure": FAULT_ABORT, "status": 503},
                     id="fault delay, then abort"),
        pytest.param({}, 0, "GET", {}, {}, {"trace": "", "failure": NO_EPS,
                                            "message": "no endpoints in etcd"},
                     id="no endpoints"),
        pytest.param(EMPTY_SUBSET, 3, "GET", {}, {},
                     {"trace": "", "failure": NO_EPS,
                      "message": "subset 'canary' of route 'all-to-canary' has no endpoints"},
                     id="route to an empty subset"),
        pytest.param({}, 3, "GET", {}, {1: R404}, {"trace": "A"}, id="404 is final"),
        pytest.param({}, 3, "GET", {}, {"*": R503},
                     {"trace": "A S:backoff A S:backoff A", "stopped": "attempts_exhausted",
                      "retries": ["gateway_error"] * 2, "stops": ["attempts_exhausted"]},
                     id="attempts exhausted"),
        pytest.param({"retries": {"attempts": 1}}, 3, "GET", {}, {"*": R503},
                     {"trace": "A", "stopped": "attempts_exhausted"},
                     id="attempts 1: never retried"),
        pytest.param({}, 3, "POST", {}, {1: R503},
                     {"trace": "A", "stopped": "not_idempotent", "stops": ["not_idempotent"]},
                     id="POST not retried after a 503"),
        pytest.param({}, 3, "POST", {}, {1: CONNECT, 2: OK},
                     {"trace": "A S:backoff A", "retries": ["connect_failure"]},
                     id="POST retried after a connect failure"),
        pytest.param(POST_KEY, 3, "POST", {"has_idempotency_key": _has_key}, {1: R503, 2: OK},
                     {"trace": "A S:backoff A"}, id="POST with Idempotency-Key, allowed"),
        pytest.param({}, 3, "POST", {"has_idempotency_key": _has_key}, {1: R503},
                     {"trace": "A", "stopped": "not_idempotent"},
                     id="POST with Idempotency-Key, policy off"),
        pytest.param({}, 3, "PUT", {"replayable": False}, {1: R503},
                     {"trace": "A", "stopped": "body_not_replayable"},
                     id="body not replayable"),
        pytest.param(NO_BUDGET, 3, "GET", {}, {"*": R503},
                     {"trace": "A", "stopped": "budget_exhausted", "stops": ["budget_exhausted"]},
                     id="retry budget exhausted"),
        pytest.param({}, 3, "GET", {}, {1: r503(2.0), 2: OK}, {"trace": "A S:backoff A"},
                     id="Retry-After honoured"),
        pytest.param({"timeout": "1s"}, 3, "GET", {}, {1: r503(5.0)},
                     {"trace": "A", "stopped": "deadline_exceeded",
                      "stops": ["deadline_exceeded"]},
                     id="Retry-After beyond the deadline: no retry"),
        pytest.param({}, 3, "POST", GRPC, {1: grpc_result("UNAVAILABLE"), 2: G_OK},
                     {"trace": "A S:backoff A", "retries": ["gateway_error"]},
                     id="gRPC UNAVAILABLE retried"),
        pytest.param({}, 3, "POST", GRPC, {1: grpc_result("NOT_FOUND")}, {"trace": "A"},
                     id="gRPC NOT_FOUND final"),
        pytest.param({}, 3, "POST", GRPC, {1: grpc_result("INTERNAL")}, {"trace": "A"},
                     id="gRPC INTERNAL not in grpc_retry_on"),
        pytest.param({"retries": {"grpc_retry_on": ["internal"]}}, 3, "POST", GRPC,
                     {1: grpc_result("INTERNAL"), 2: G_OK}, {"trace": "A S:backoff A"},
                     id="gRPC INTERNAL retried when listed"),
        pytest.param({}, 3, "POST", GRPC, {1: CONNECT, 2: G_OK}, {"trace": "A S:backoff A"},
                     id="gRPC connect failure retried"),
        pytest.param({}, 3, "POST", GRPC, {1: grpc_result("UNAVAILABLE", 0.2), 2: G_OK},
                     {"trace": "A S:backoff A"}, id="gRPC pushback honoured"),
        pytest.param({}, 3, "POST", GRPC, {1: grpc_result("UNAVAILABLE", -1.0)},
                     {"trace": "A", "stopped": "server_pushback", "stops": ["server_pushback"]},
                     id="gRPC negative pushback stops retries"),
    ],
)
def test_call_plan_table(raw, n, method, kw, script, want):
    dest, clock = make_dest(raw, n)
    end, actions, obs = call(dest, clock, script, method, **kw)
    assert trace(actions) == want["trace"]
    assert end.attempts == len(attempts(actions))
    assert end.failure == want.get("failure")
    assert end.stopped == want.get("stopped")
    assert end.status == want.get("status")
    assert want.get("message", "") in end.message
    if end.failure is None:  # the last attempt's result stands
        assert end.result is script.get(end.attempts, script.get("*"))
    else:
        assert end.message.startswith(f"service {SVC!r}")
    if "retries" in want:
        assert obs.retries == want["retries"]
    if "stops" in want:
        assert obs.stops == want["stops"]
    assert_released(dest)


# --------------------------------------------------------------------------- delays


def test_fault_delay_sleeps_the_configured_duration_first():
    dest, clock = make_dest({"fault": {"delay": {"percent": 100, "duration": "250ms"}}})
    t0 = clock()
    end, actions, _ = call(dest, clock, {1: OK})
    first = actions[0]
    assert isinstance(first, Sleep) and first.seconds == 0.25 and first.reason == "fault_delay"
    assert end.result is OK and clock() == t0 + 0.25


def test_fault_injection_is_a_share_of_calls_drawn_from_the_seeded_rng():
    raw = {"fault": {"abort": {"percent": 50}}}
    ends = []
    for _ in range(2):
        dest, clock = make_dest(raw, seed=11)
        ends.append([call(dest, clock, {"*": OK})[0].failure for _ in range(200)])
    assert ends[0] == ends[1]  # deterministic for a seed
    aborted = ends[0].count(FAULT_ABORT)
    assert 60 < aborted < 140
    assert set(ends[0]) == {FAULT_ABORT, None}


def test_retry_goes_to_a_different_endpoint_after_a_jittered_backoff():
    seen: list[float] = []
    for seed in range(30):
        dest, clock = make_dest(seed=seed)
        end, actions, _ = call(dest, clock, {1: R503, 2: R503, 3: OK})
        assert trace(actions) == "A S:backoff A S:backoff A"
        assert len(set(names(actions))) == 3  # every retry on an endpoint not tried yet
        s1, s2 = (s.seconds for s in sleeps(actions))
        assert 0.0 <= s1 <= 0.010  # retry 1: uniform(0, base)
        assert 0.0 <= s2 <= 0.020  # retry 2: uniform(0, min(2 * base, max))
        seen.append(s1)
        assert end.result is OK and end.attempts == 3
    assert len(set(seen)) > 20  # full jitter: drawn, not fixed


@pytest.mark.parametrize(
    ("first", "kw", "delay"),
    [
        pytest.param(r503(2.0), {}, 2.0, id="Retry-After"),
        pytest.param(r503(0.5), {}, 0.5, id="Retry-After beyond backoff max"),
        pytest.param(grpc_result("UNAVAILABLE", 0.2), GRPC, 0.2, id="gRPC pushback"),
        pytest.param(grpc_result("UNAVAILABLE", 1.5), GRPC, 1.5, id="gRPC pushback 1.5s"),
    ],
)
def test_server_delay_replaces_the_backoff(first, kw, delay):
    dest, clock = make_dest()
    end, actions, _ = call(dest, clock, {1: first, 2: G_OK if kw else OK}, "POST" if kw else "GET",
                           **kw)
    (s,) = sleeps(actions)
    assert s.seconds == delay and s.reason == "backoff"
    assert end.attempts == 2 and end.failure is None


def test_retry_after_zero_retries_at_once():
    dest, clock = make_dest()
    end, actions, obs = call(dest, clock, {1: r503(0.0), 2: OK})
    assert trace(actions) == "A A"
    assert end.result is OK and obs.retries == ["gateway_error"]


# --------------------------------------------------------------------------- deadline


def test_per_try_timeout_is_the_smaller_of_per_try_and_remaining():
    raw = {"timeout": "1s", "retries": {"per_try_timeout": "400ms", "attempts": 5}}
    dest, clock = make_dest(raw, 5)
    deadline = clock() + 1.0
    times: list[float] = []
    end, actions, obs = call(dest, clock, {"*": (TIMEOUT, FULL)}, times=times)
    tries = [(a, t) for a, t in zip(actions, times, strict=True) if isinstance(a, Attempt)]
    assert len(tries) == 3
    for a, t in tries:
        assert a.deadline.at == deadline
        assert a.timeout == pytest.approx(min(0.4, deadline - t))
    assert tries[0][0].timeout == tries[1][0].timeout == 0.4
    assert tries[2][0].timeout < 0.4  # only what is left of the 1 s
    # the third attempt timed out at the deadline: the call ends as deadline exceeded
    assert clock() == pytest.approx(deadline)
    assert end.failure == FailureKind.DEADLINE and end.stopped == "deadline_exceeded"
    assert end.result is TIMEOUT and end.attempts == 3
    assert "deadline exceeded after 3 attempt(s)" in end.message
    assert obs.stops == ["deadline_exceeded"]
    assert_released(dest)


def test_caller_deadline_earlier_than_the_policy_bounds_the_attempt():
    dest, clock = make_dest({"retries": {"per_try_timeout": "2s"}})  # policy timeout 15 s
    upstream = Deadline(clock() + 0.3)
    end, actions, _ = call(dest, clock, {1: OK}, deadline=upstream)
    (a,) = attempts(actions)
    assert a.timeout == pytest.approx(0.3) and a.deadline.at == upstream.at
    assert end.result is OK


@pytest.mark.parametrize(
    ("raw", "timeout"),
    [
        pytest.param({"timeout": None}, None, id="no deadline, no per-try"),
        pytest.param({"timeout": None, "retries": {"per_try_timeout": "500ms"}}, 0.5,
                     id="no deadline, per-try"),
        pytest.param({}, 15.0, id="default 15 s"),
    ],
)
def test_attempt_timeout_without_a_caller_deadline(raw, timeout):
    dest, clock = make_dest(raw)
    _, actions, _ = call(dest, clock, {1: OK})
    assert attempts(actions)[0].timeout == timeout


def test_expired_caller_deadline_ends_before_any_attempt():
    dest, clock = make_dest()
    end, actions, _ = call(dest, clock, {}, deadline=Deadline(clock()))
    assert actions == [] and end.attempts == 0 and end.result is None
    assert end.failure == FailureKind.DEADLINE
    assert_released(dest)


@pytest.mark.parametrize(
    ("raw", "method", "kw"),
    [
        pytest.param({}, "GET", {}, id="a retry would pass the deadline"),
        pytest.param({"retries": {"attempts": 1}}, "GET", {}, id="no attempts left"),
        pytest.param({}, "POST", {}, id="not idempotent"),
        pytest.param({}, "PUT", {"replayable": False}, id="body not replayable"),
        pytest.param({"retries": {"retry_on": ["retriable-status-codes"],
                                  "retriable_status_codes": [429]}}, "GET", {},
                     id="timeouts not in retry_on"),
    ],
)
def test_timeout_at_the_overall_deadline_ends_as_deadline_exceeded(raw, method, kw):
    """docs/http.md "Deadlines and timeouts": when the overall deadline passes, the call
    ends with DeadlineExceededError (or with the last response, if an attempt answered).
    Here no attempt answered: the only attempt timed out when the 1 s deadline did, so the
    end must say DEADLINE whatever would (also) have refused a retry."""
    dest, clock = make_dest(merge_policy_dicts({"timeout": "1s"}, raw))
    end, actions, _ = call(dest, clock, {1: (TIMEOUT, FULL)}, method, **kw)
    (a,) = attempts(actions)
    assert a.timeout == 1.0
    assert end.result is TIMEOUT and end.attempts == 1
    assert end.failure == FailureKind.DEADLINE, (end.failure, end.stopped)


# --------------------------------------------------------------------------- concurrency


def test_concurrency_limit_and_its_release():
    dest, clock = make_dest({"concurrency": {"max_requests": 1}})
    first = run_call(dest, dest.plan(), method="GET")
    a = next(first)
    assert isinstance(a, Attempt) and dest.inflight == 1

    end, actions, _ = call(dest, clock, {"*": OK})  # the second call while the first is open
    assert actions == [] and end.failure == FailureKind.CONCURRENCY and end.attempts == 0
    assert "concurrency limit reached (1 requests in flight)" in end.message
    assert dest.inflight == 1  # a refused call takes no slot

    with pytest.raises(StopIteration) as stop:  # the first completes: its slot is free
        first.send(OK)
    assert stop.value.value.result is OK
    assert_released(dest)
    assert call(dest, clock, {"*": OK})[0].result is OK


@pytest.mark.parametrize("where", ["attempt", "backoff"])
def test_closing_the_generator_releases_the_slot_and_the_load(where):
    dest, clock = make_dest({"concurrency": {"max_requests": 1}})
    gen = run_call(dest, dest.plan(), method="GET")
    a = next(gen)
    if where == "backoff":
        assert isinstance(gen.send(R503), Sleep)
    else:
        assert dest.stats.slot(a.endpoint.key).in_flight == 1
    gen.close()  # what a driver does when its caller is cancelled
    assert_released(dest)
    end, actions, _ = call(dest, clock, {"*": OK})
    assert end.result is OK and trace(actions) == "A"


# --------------------------------------------------------------------------- circuit breaker

BREAKER = {"circuit_breaker": {"failure_threshold": 2, "reset_timeout": "5s"},
           "retries": {"attempts": 1}}


def _open_the_only_breaker() -> tuple[DestinationState, Clock, Recorder]:
    dest, clock = make_dest(BREAKER, 1)
    obs = Recorder()
    for _ in range(2):
        end, _, _ = call(dest, clock, {"*": R503}, obs=obs)
        assert end.result is R503
    assert obs.kinds() == [EventKind.BREAKER_OPENED]
    assert obs.events[0].reason == "consecutive_failures" and obs.events[0].count == 2
    return dest, clock, obs


def test_open_breaker_on_the_only_endpoint_fails_fast():
    dest, clock, _ = _open_the_only_breaker()
    end, actions, _ = call(dest, clock, {})
    assert actions == [] and end.attempts == 0 and end.result is None
    assert end.failure == FailureKind.CIRCUIT_OPEN
    assert "all 1 endpoint(s) are ejected or have an open circuit breaker" in end.message
    assert_released(dest)


def test_breaker_opening_mid_call_ends_it_with_the_last_result():
    raw = {"circuit_breaker": {"failure_threshold": 2, "reset_timeout": "5s"}}  # 3 attempts
    dest, clock = make_dest(raw, 1)
    end, actions, obs = call(dest, clock, {"*": R503})
    assert names(actions) == ["i0", "i0"]  # one endpoint: the retry reuses it
    assert end.failure == FailureKind.CIRCUIT_OPEN and end.result is R503
    assert end.attempts == 2 and obs.kinds() == [EventKind.BREAKER_OPENED]


def test_half_open_admits_one_trial_and_closes_on_success():
    dest, clock, _ = _open_the_only_breaker()
    clock.advance(5.0)
    obs = Recorder()
    trial = run_call(dest, dest.plan(), method="GET", observer=obs)
    a = next(trial)
    assert isinstance(a, Attempt)
    assert dest.health.state(a.endpoint) == HALF_OPEN
    # while the trial runs, other calls are refused without an attempt
    end, actions, _ = call(dest, clock, {})
    assert actions == [] and end.failure == FailureKind.CIRCUIT_OPEN
    with pytest.raises(StopIteration) as stop:
        trial.send(OK)
    assert stop.value.value.result is OK
    assert obs.kinds() == [EventKind.BREAKER_HALF_OPEN, EventKind.BREAKER_CLOSED]
    assert obs.events[1].reason == "trial_succeeded"
    end, actions, _ = call(dest, clock, {"*": OK})
    assert trace(actions) == "A" and end.result is OK
    assert_released(dest)


def test_failed_trial_reopens_the_breaker():
    dest, clock, _ = _open_the_only_breaker()
    clock.advance(5.0)
    end, actions, obs = call(dest, clock, {"*": R503})
    assert trace(actions) == "A" and end.result is R503
    assert obs.kinds() == [EventKind.BREAKER_HALF_OPEN, EventKind.BREAKER_OPENED]
    assert obs.events[1].reason == "trial_failed"
    end, actions, _ = call(dest, clock, {})
    assert actions == [] and end.failure == FailureKind.CIRCUIT_OPEN


def test_closing_a_half_open_trial_frees_its_slot_and_reports_the_transition():
    """A cancelled trial is no failure: its trial place is freed (a new call is admitted).
    The breaker did move to half-open when the trial was admitted; the hedged plan reports
    that (``_released`` passes ``health.release`` events to the observer), so the plain plan
    must too, or a breaker-state gauge keeps showing ``open``."""
    dest, clock, _ = _open_the_only_breaker()
    clock.advance(5.0)
    obs = Recorder()
    gen = run_call(dest, dest.plan(), method="GET", observer=obs)
    a = next(gen)
    assert dest.health.slot(a.endpoint.key).trials == 1
    gen.close()
    assert dest.health.slot(a.endpoint.key).trials == 0
    admission = dest.health.admit(a.endpoint, clock())
    assert admission != REJECT  # the next trial is admitted
    dest.health.release(a.endpoint, admission, clock())
    assert_released(dest)
    assert obs.kinds() == [EventKind.BREAKER_HALF_OPEN]


# --------------------------------------------------------------------------- outlier ejection

OUTLIER = {
    "circuit_breaker": {"enabled": False},
    "outlier_detection": {"enabled": True, "consecutive_5xx": 2,
                          "consecutive_gateway_failure": 2, "max_ejection_percent": 50,
                          "base_ejection_time": "30s", "max_ejection_time": "300s"},
    "retries": {"attempts": 1},
}


def test_outlier_ejection_skips_the_failing_endpoint_within_max_percent():
    dest, clock = make_dest(OUTLIER, 2)
    obs = Recorder()
    failures = 0
    for _ in range(40):
        end, actions, _ = call(dest, clock, {"i0": R503, "i1": OK}, obs=obs)
        failures += names(actions) == ["i0"]
        if EventKind.EJECTED in obs.kinds():
            break
    assert failures == 2  # consecutive_5xx
    (ev,) = obs.events
    assert ev.kind == EventKind.EJECTED and ev.key == "/svc/orders/i0"
    assert ev.reason == "consecutive_5xx" and ev.duration_s == 30.0
    for _ in range(20):  # ejected: never picked, the other endpoint takes everything
        end, actions, _ = call(dest, clock, {"i1": OK})
        assert names(actions) == ["i1"] and end.result is OK
    # a second ejection would pass 50 % of 2 endpoints: skipped, i1 stays in use
    for _ in range(2):
        end, actions, _ = call(dest, clock, {"i1": R503}, obs=obs)
        assert names(actions) == ["i1"]
    assert obs.kinds("/svc/orders/i1") == [EventKind.EJECTION_SKIPPED]
    assert dest.health.usable("/svc/orders/i1", clock())
    clock.advance(30.0)  # the ejection time passed: i0 is picked again
    picked = {names(call(dest, clock, {"*": OK})[1])[0] for _ in range(20)}
    assert picked == {"i0", "i1"}
    assert_released(dest)


# --------------------------------------------------------------------------- zones

ZONED = (ep(0, "z1"), ep(1, "z1"), ep(2, "z2"), ep(3, "z2"))
ONE_BREAK = {"circuit_breaker": {"failure_threshold": 1, "reset_timeout": "60s"}}


def _block(dest: DestinationState, clock: Clock, *keys: int) -> None:
    h = dest.health
    for i in keys:
        k = f"/svc/{SVC}/i{i}"
        h.record(k, Outcome.CONNECT_FAILURE, h.admit(k, clock()), clock())
        assert not h.usable(k, clock())


@pytest.mark.parametrize(
    ("blocked", "expected"),
    [
        pytest.param((), {"i0", "i1"}, id="local zone first"),
        pytest.param((0,), {"i1"}, id="half the local zone usable: stay local"),
        pytest.param((0, 1), {"i2", "i3"}, id="local zone blocked: spill over"),
    ],
)
def test_zone_preference(blocked, expected):
    dest, clock = make_dest(ONE_BREAK, ZONED, zone="z1")
    _block(dest, clock, *blocked)
    picked = set()
    for _ in range(30):
        end, actions, _ = call(dest, clock, {"*": OK})
        picked.update(names(actions))
    assert picked == expected


def test_zone_retry_prefers_an_untried_remote_endpoint_to_the_failed_local_one():
    eps = (ep(0, "z1"), ep(1, "z2"), ep(2, "z2"))
    dest, clock = make_dest({}, eps, zone="z1")
    end, actions, _ = call(dest, clock, {"i0": R503, "*": OK})
    assert names(actions)[0] == "i0" and names(actions)[1] in {"i1", "i2"}
    assert end.result is OK


def test_without_a_local_zone_every_endpoint_is_a_candidate():
    dest, clock = make_dest({}, ZONED, zone=None)
    picked = {n for _ in range(40) for n in names(call(dest, clock, {"*": OK})[1])}
    assert picked == {"i0", "i1", "i2", "i3"}


# --------------------------------------------------------------------------- routes

LABELLED = (ep(0, version="v1"), ep(1, version="v1"), ep(2, version="v2"), ep(3, version="v2"))
CANARY = {
    "subsets": {"v2": {"labels": {"version": "v2"}}},
    "routes": [{"name": "canary", "match": {"headers": {"X-Canary": "yes"}},
                "split": [{"subset": "v2", "weight": 1}]}],
}


def headers(**values: str) -> Callable[[str], str | None]:
    low = {k.replace("_", "-").lower(): v for k, v in values.items()}
    return low.get


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(headers(x_canary="yes"), {"i2", "i3"}, id="matching header: subset"),
        pytest.param(headers(x_canary="no"), {"i0", "i1", "i2", "i3"}, id="other value: all"),
        pytest.param(None, {"i0", "i1", "i2", "i3"}, id="no headers: all"),
    ],
)
def test_header_route_picks_the_subset(header, expected):
    dest, clock = make_dest(CANARY, LABELLED)
    picked = {n for _ in range(40)
              for n in names(call(dest, clock, {"*": OK}, header=header)[1])}
    assert picked == expected


def test_retries_stay_in_the_routed_subset():
    dest, clock = make_dest(CANARY, LABELLED)
    end, actions, _ = call(dest, clock, {"*": R503}, header=headers(x_canary="yes"))
    assert end.attempts == 3 and set(names(actions)) == {"i2", "i3"}
    assert end.stopped == "attempts_exhausted"


# --------------------------------------------------------------------------- ring hash


@pytest.mark.parametrize(
    ("hash_on", "lookup"),
    [
        pytest.param({"header": "x-user"}, lambda user: headers(x_user=user), id="header"),
        pytest.param({"cookie": "session"},
                     lambda user: headers(cookie=f"theme=dark; session={user}"), id="cookie"),
    ],
)
def test_ring_hash_keeps_a_key_on_one_endpoint(hash_on, lookup):
    raw = {"load_balancer": {"policy": "ring_hash", "hash_on": hash_on}}
    dest, clock = make_dest(raw, 5)
    owner: dict[str, str] = {}
    for _ in range(3):
        for u in range(20):
            (name,) = names(call(dest, clock, {"*": OK}, header=lookup(f"user-{u}"))[1])
            assert owner.setdefault(f"user-{u}", name) == name
    assert len(set(owner.values())) >= 3  # keys spread over the ring
    # a failed attempt moves on to another endpoint, the next call comes back to the owner
    h = lookup("user-0")
    first = owner["user-0"]
    end, actions, _ = call(dest, clock, {first: R503, "*": OK}, header=h)
    assert names(actions)[0] == first and names(actions)[1] != first and end.result is OK
    assert names(call(dest, clock, {"*": OK}, header=h)[1]) == [first]
    # another destination state with the same endpoints agrees (the ring is not random)
    other, oclock = make_dest(raw, 5, seed=99)
    assert names(call(other, oclock, {"*": OK}, header=h)[1]) == [first]
