"""Retry decisions, backoff, idempotency, header parsing and hedging."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tenacity import wait_exponential

from meshlib.config.policy import Policy, parse_policy_dict
from meshlib.core.budget import RetryBudget
from meshlib.core.deadline import Deadline
from meshlib.core.outcome import Outcome
from meshlib.core.retry import (
    FINISH,
    NO_RETRY_PUSHBACK,
    Backoff,
    Fail,
    FailReason,
    Retry,
    RetryPolicy,
    is_idempotent,
    parse_pushback_ms,
    parse_retry_after,
)

OC = Outcome


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_policy(clock: Clock, *, budget: RetryBudget | None = None, seed: int = 1,
                **overrides) -> RetryPolicy:
    raw: dict = {"retries": {"retry_on": ["5xx", "retriable-4xx"],
                             "grpc_retry_on": ["unavailable"]}}
    for k, v in overrides.items():
        if k == "timeout":
            raw["timeout"] = v
        else:
            raw["retries"][k] = v
    policy = parse_policy_dict(raw, "test")
    return RetryPolicy.from_policy(policy, now=clock, rng=random.Random(seed), budget=budget)


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("n", "ceiling"),
    [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (6, 0.25), (40, 0.25), (0, 0.025)],
)
def test_backoff_ceiling_table(n, ceiling):
    assert Backoff(0.025, 0.25, random.Random(0)).ceiling(n) == pytest.approx(ceiling)


def test_backoff_ceiling_matches_tenacity_wait_exponential():
    b = Backoff(0.01, 1.0, random.Random(0))
    wait = wait_exponential(multiplier=0.01, max=1.0)
    for n in range(1, 20):
        assert b.ceiling(n) == wait(SimpleNamespace(attempt_number=n))


def test_backoff_full_jitter_bounds_and_spread():
    b = Backoff(0.025, 0.25, random.Random(3))
    for n in range(1, 8):
        draws = [b.delay(n) for _ in range(2000)]
        cap = b.ceiling(n)
        assert all(0.0 <= d <= cap for d in draws)
        # full jitter: uses the whole interval, mean about cap/2
        assert min(draws) < 0.05 * cap and max(draws) > 0.95 * cap
        assert sum(draws) / len(draws) == pytest.approx(cap / 2, rel=0.1)


def test_backoff_rejects_bad_parameters():
    with pytest.raises(ValueError, match="base"):
        Backoff(0.5, 0.1, random.Random(0))


# --------------------------------------------------------------------------- idempotency


@pytest.mark.parametrize(
    ("method", "has_key", "allow_post", "expected"),
    [
        ("GET", False, False, True),
        ("get", False, False, True),
        ("HEAD", False, False, True),
        ("OPTIONS", False, False, True),
        ("PUT", False, False, True),
        ("DELETE", False, False, True),
        ("TRACE", False, False, True),
        ("POST", False, False, False),
        ("POST", True, False, False),
        ("POST", True, True, True),
        ("POST", False, True, False),
        ("PATCH", True, True, False),
        ("CONNECT", False, False, False),
    ],
)
def test_is_idempotent_table(method, has_key, allow_post, expected):
    retries = parse_policy_dict(
        {"retries": {"allow_post_with_idempotency_key": allow_post}}, "k"
    ).retries
    assert is_idempotent(method, has_key, retries) is expected


def test_is_idempotent_respects_configured_methods():
    retries = parse_policy_dict({"retries": {"methods": ["GET"]}}, "k").retries
    assert is_idempotent("GET", False, retries)
    assert not is_idempotent("PUT", False, retries)


# --------------------------------------------------------------------------- header parsing


@pytest.mark.parametrize(
    ("value", "wall_now", "expected"),
    [
        (None, None, None),
        ("120", None, 120.0),
        (" 3 ", None, 3.0),
        ("0", None, 0.0),
        ("-1", None, None),
        ("1.5", None, None),
        ("soon", 0.0, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None, None),  # a date needs the wall clock
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0, 10.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1445412490.0, 0.0),  # in the past
    ],
)
def test_parse_retry_after_table(value, wall_now, expected):
    assert parse_retry_after(value, wall_now) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("0", 0.0), ("250", 0.25), ("-1", NO_RETRY_PUSHBACK),
     ("abc", NO_RETRY_PUSHBACK), ("", NO_RETRY_PUSHBACK), ("1.5", NO_RETRY_PUSHBACK)],
)
def test_parse_pushback_table(value, expected):
    assert parse_pushback_ms(value) == expected


# --------------------------------------------------------------------------- decisions

# Each row: description, new_call kwargs, attempts already made, outcome, status,
# decide kwargs, expected decision type, expected fail reason / delay check.
DECISIONS = [
    ("success finishes", {}, 1, OC.SUCCESS, 200, {}, "finish", None),
    ("404 is not retryable", {}, 1, OC.HTTP_4XX, 404, {}, "finish", None),
    ("409 retriable-4xx", {}, 1, OC.HTTP_4XX, 409, {}, "retry", None),
    ("500 retried on 5xx", {}, 1, OC.HTTP_5XX, 500, {}, "retry", None),
    ("local not retried", {}, 1, OC.LOCAL, None, {}, "finish", None),
    ("POST 503 not idempotent", {"method": "POST"}, 1, OC.GATEWAY_ERROR, 503, {},
     "fail", FailReason.NOT_IDEMPOTENT),
    ("POST reset not idempotent", {"method": "POST"}, 1, OC.RESET, None, {},
     "fail", FailReason.NOT_IDEMPOTENT),
    ("POST connect failure never sent", {"method": "POST"}, 1, OC.CONNECT_FAILURE, None, {},
     "retry", None),
    ("POST refused stream never processed", {"method": "POST"}, 1, OC.REFUSED_STREAM, None, {},
     "retry", None),
    ("stream body not replayable", {"replayable": False}, 1, OC.GATEWAY_ERROR, 503, {},
     "fail", FailReason.NOT_REPLAYABLE),
    ("attempts exhausted", {}, 3, OC.GATEWAY_ERROR, 503, {}, "fail",
     FailReason.ATTEMPTS_EXHAUSTED),
    ("second of three ok", {}, 2, OC.GATEWAY_ERROR, 503, {}, "retry", None),
    ("retry-after honoured", {}, 1, OC.GATEWAY_ERROR, 503, {"retry_after_s": 2.0},
     "retry", 2.0),
    ("retry-after beyond deadline", {}, 1, OC.GATEWAY_ERROR, 503, {"retry_after_s": 20.0},
     "fail", FailReason.DEADLINE),
    ("retry-after equal to remaining", {}, 1, OC.GATEWAY_ERROR, 503, {"retry_after_s": 15.0},
     "fail", FailReason.DEADLINE),
    ("grpc pushback honoured", {"grpc": True}, 1, OC.GATEWAY_ERROR, None,
     {"grpc_code": "UNAVAILABLE", "pushback_s": 0.3}, "retry", 0.3),
    ("grpc negative pushback stops", {"grpc": True}, 1, OC.GATEWAY_ERROR, None,
     {"grpc_code": "UNAVAILABLE", "pushback_s": NO_RETRY_PUSHBACK}, "fail",
     FailReason.PUSHBACK),
    ("grpc unavailable retried", {"grpc": True}, 1, OC.GATEWAY_ERROR, None,
     {"grpc_code": "UNAVAILABLE"}, "retry", None),
    ("grpc internal not in grpc_retry_on", {"grpc": True}, 1, OC.HTTP_5XX, None,
     {"grpc_code": "INTERNAL"}, "finish", None),
    ("grpc ignores http method", {"grpc": True, "method": "POST"}, 1, OC.GATEWAY_ERROR, None,
     {"grpc_code": "unavailable"}, "retry", None),
]


@pytest.mark.parametrize(
    ("desc", "call", "attempts", "outcome", "status", "kw", "kind", "detail"),
    DECISIONS, ids=[d[0] for d in DECISIONS],
)
def test_decide_table(desc, call, attempts, outcome, status, kw, kind, detail):
    clock = Clock()
    policy = make_policy(clock)  # timeout 15 s, 3 attempts, budget 20 % + 10/s
    state = policy.new_call(**call)
    for i in range(attempts):
        state.begin_attempt(f"ep{i}")
    decision = policy.decide(state, outcome, status, now=clock.t, **kw)
    if kind == "finish":
        assert decision is FINISH
    elif kind == "fail":
        assert decision == Fail(detail)
    else:
        assert isinstance(decision, Retry)
        if detail is None:
            assert 0.0 <= decision.delay_s <= 0.25
        else:
            assert decision.delay_s == pytest.approx(detail)


def test_deadline_exceeded_by_backoff():
    clock = Clock()
    policy = make_policy(clock, timeout="1s")
    state = policy.new_call()
    state.begin_attempt("a")
    clock.t += 0.99999  # almost all of the deadline used; any backoff >= 10 us fails
    decisions = {type(policy.decide(state, OC.GATEWAY_ERROR, 503)) for _ in range(5)}
    assert decisions <= {Fail, Retry}
    clock.t += 0.1
    assert policy.decide(state, OC.GATEWAY_ERROR, 503) == Fail(FailReason.DEADLINE)


def test_budget_exhausted():
    clock = Clock()
    budget = RetryBudget(0, 1, 10.0, clock)  # reserve: 10 retries per window, no share
    policy = make_policy(clock, budget=budget)
    results = []
    for _ in range(15):
        state = policy.new_call()
        state.begin_attempt("a")
        results.append(policy.decide(state, OC.GATEWAY_ERROR, 503))
    assert sum(isinstance(r, Retry) for r in results) == 10
    assert results[-1] == Fail(FailReason.BUDGET_EXHAUSTED)


def test_budget_not_spent_when_refused_for_other_reasons():
    clock = Clock()
    budget = RetryBudget(0, 0.1, 10.0, clock)  # exactly one retry in the reserve
    policy = make_policy(clock, budget=budget)
    state = policy.new_call(method="POST")
    state.begin_attempt("a")
    assert policy.decide(state, OC.GATEWAY_ERROR, 503) == Fail(FailReason.NOT_IDEMPOTENT)
    state = policy.new_call()
    state.begin_attempt("a")
    assert isinstance(policy.decide(state, OC.GATEWAY_ERROR, 503), Retry)


def test_new_call_deposits_and_deadline_combines_with_incoming():
    clock = Clock()
    budget = RetryBudget(100, 0, 10.0, clock)
    policy = make_policy(clock, budget=budget)
    state = policy.new_call(deadline=Deadline(clock.t + 2.0))
    assert state.deadline.at == clock.t + 2.0  # incoming 2 s beats policy 15 s
    assert budget.available() == pytest.approx(1.0)
    state = policy.new_call(deadline=Deadline(clock.t + 60.0))
    assert state.deadline.at == clock.t + 15.0


def test_attempt_timeout_is_min_of_per_try_and_remaining():
    clock = Clock()
    policy = make_policy(clock, per_try_timeout="2s", timeout="5s")
    state = policy.new_call()
    assert policy.attempt_timeout(state, clock.t) == 2.0
    assert policy.attempt_timeout(state, clock.t + 4.0) == pytest.approx(1.0)
    no_timeout = RetryPolicy(Policy().retries, None, now=clock, rng=random.Random(0))
    assert no_timeout.attempt_timeout(no_timeout.new_call(), clock.t) is None


def test_retry_delays_grow_with_retry_number():
    clock = Clock()
    policy = make_policy(clock, attempts=5, budget=RetryBudget(100, 10_000, 10.0, clock))
    caps = []
    for _ in range(200):
        state = policy.new_call()
        delays = []
        for i in range(5):
            state.begin_attempt(f"e{i}")
            d = policy.decide(state, OC.GATEWAY_ERROR, 503)
            if isinstance(d, Retry):
                delays.append(d.delay_s)
        caps.append(delays)
    for n, cap in enumerate((0.025, 0.05, 0.1, 0.2)):
        assert max(c[n] for c in caps) <= cap
        assert max(c[n] for c in caps) > 0.8 * cap


def test_call_state_tracks_tried_endpoints():
    clock = Clock()
    policy = make_policy(clock)
    state = policy.new_call()
    state.begin_attempt("a")
    state.begin_attempt("b")
    assert state.attempt == 2 and state.tried == {"a", "b"}


# --------------------------------------------------------------------------- hedging


def test_hedging_plan_and_may_hedge():
    clock = Clock()
    raw = {"retries": {"hedging": {"enabled": True, "delay": "20ms", "max_extra": 2}}}
    policy = RetryPolicy.from_policy(parse_policy_dict(raw, "k"), now=clock,
                                     rng=random.Random(0))
    assert (policy.hedging.enabled, policy.hedging.delay_s, policy.hedging.max_extra) == (
        True, 0.02, 2)
    state = policy.new_call()
    state.begin_attempt("a")
    assert policy.may_hedge(state)
    assert policy.may_hedge(state)
    assert not policy.may_hedge(state)  # max_extra reached
    assert not policy.may_hedge(policy.new_call(method="POST"))
    assert not policy.may_hedge(policy.new_call(replayable=False))


def test_hedging_disabled_by_default():
    clock = Clock()
    policy = make_policy(clock)
    assert not policy.hedging.enabled
    assert not policy.may_hedge(policy.new_call())
