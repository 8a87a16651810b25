"""Hedged calls in the sans-I/O call plan (``meshlib.core.call``), driven by hand.

No I/O and no threads: a fake clock, a seeded RNG, a ``DestinationState`` over a fixed
snapshot, and a tiny driver (:class:`Drive`) that sends exactly what a hedged-mode driver
sends (``HEDGE`` when a timer expires, ``Done(attempt, result)`` when an attempt ends).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from plan_fakes import Clock, Recorder

from meshlib.config.policy import parse_policy_dict
from meshlib.core.call import (
    HEDGE,
    HEDGE_REASON,
    WAIT,
    Attempt,
    AttemptResult,
    CallEnd,
    Done,
    FailureKind,
    Sleep,
    run_call,
)
from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.core.health import REJECT
from meshlib.core.outcome import Outcome

SVC = "orders"
OK = AttemptResult(Outcome.SUCCESS, 200, "ok")
R503 = AttemptResult(Outcome.GATEWAY_ERROR, 503, "busy")
R404 = AttemptResult(Outcome.HTTP_4XX, 404, "missing")


def hedge_policy(*, delay: str = "50ms", max_extra: int = 1, enabled: bool = True,
                 **fields: Any) -> dict[str, Any]:
    retries = {"backoff": {"base": "1ms", "max": "2ms"},
               "hedging": {"enabled": enabled, "delay": delay, "max_extra": max_extra},
               **fields.pop("retries", {})}
    return {"retries": retries, "outlier_detection": {"enabled": False}, **fields}


def make_dest(n: int = 2, raw: dict[str, Any] | None = None,
              clock: Clock | None = None) -> DestinationState:
    eps = tuple(Endpoint(SVC, f"i{i}", "127.0.0.1", 9000 + i, key=f"/svc/{SVC}/i{i}")
                for i in range(n))
    policy = parse_policy_dict(raw if raw is not None else hedge_policy(), "test")
    snap = ServiceSnapshot(SVC, eps, policy)
    dest = DestinationState(SVC, lambda: snap, now=clock or Clock(), rng=random.Random(7))
    dest.plan()  # configures breakers and load stats from the policy
    return dest


class Drive:
    """Steps one call's generator the way a hedged-mode driver does."""

    def __init__(self, dest: DestinationState, method: str = "GET", **kw: Any) -> None:
        self.dest = dest
        self.obs = Recorder()
        self.gen = run_call(dest, dest.plan(), method=method, observer=self.obs, **kw)
        self.end: CallEnd | None = None
        self.action: Any = self._step(None, first=True)

    def _step(self, msg: Any, first: bool = False) -> Any:
        try:
            self.action = next(self.gen) if first else self.gen.send(msg)
        except StopIteration as stop:
            self.end = stop.value
            self.action = None
        return self.action

    def hedge(self) -> Any:
        return self._step(HEDGE)

    def done(self, attempt: Attempt, result: AttemptResult) -> Any:
        return self._step(Done(attempt, result))

    def slept(self) -> Any:
        assert isinstance(self.action, Sleep), self.action
        return self._step(None)


def in_flight(dest: DestinationState) -> dict[str, int]:
    return {k: dest.stats.slot(k).in_flight for k in sorted(dest.stats.keys())}


def key(a: Attempt) -> str:
    return str(a.endpoint.key)


# --------------------------------------------------------------------------- who hedges


def test_hedging_off_yields_plain_attempts_and_takes_plain_results():
    dest = make_dest(raw=hedge_policy(enabled=False))
    d = Drive(dest)
    a = d.action
    assert type(a) is Attempt and a.hedge_after is None
    d._step(OK)  # the non-hedged protocol: the bare AttemptResult
    assert d.end is not None and d.end.result is OK and d.end.cancelled == ()
    assert dest.inflight == 0


@pytest.mark.parametrize(
    ("case", "method", "kwargs", "n", "hedged"),
    [
        ("GET", "GET", {}, 2, True),
        ("PUT is idempotent", "PUT", {}, 2, True),
        ("POST never", "POST", {}, 2, False),
        ("POST with Idempotency-Key but policy off", "POST",
         {"has_idempotency_key": lambda: True}, 2, False),
        ("streamed body", "GET", {"replayable": False}, 2, False),
        ("gRPC never hedges", "POST", {"grpc": True}, 2, False),
        ("one endpoint: nowhere to hedge to", "GET", {}, 1, False),
    ],
)
def test_which_calls_hedge(case, method, kwargs, n, hedged):
    dest = make_dest(n)
    d = Drive(dest, method, **kwargs)
    a = d.action
    assert isinstance(a, Attempt), case
    assert (a.hedge_after is not None) is hedged, case


def test_post_with_idempotency_key_hedges_when_the_policy_allows_it():
    dest = make_dest(raw=hedge_policy(retries={"allow_post_with_idempotency_key": True}))
    d = Drive(dest, "POST", has_idempotency_key=lambda: True)
    assert d.action.hedge_after == pytest.approx(0.05)


# --------------------------------------------------------------------------- the race


def test_hedge_goes_to_another_endpoint_and_first_final_answer_wins():
    clock = Clock()
    dest = make_dest(2, clock=clock)
    d = Drive(dest)
    first = d.action
    assert first.number == 1 and first.hedge_after == pytest.approx(0.05)
    clock.advance(0.05)
    second = d.hedge()
    assert isinstance(second, Attempt) and second.number == 2
    assert key(second) != key(first)
    assert second.hedge_after is None  # max_extra 1: no further timer
    assert d.obs.retries == [HEDGE_REASON]
    assert set(in_flight(dest).values()) == {1}
    clock.advance(0.01)
    d.done(second, OK)
    end = d.end
    assert end is not None and end.result is OK and end.failure is None
    assert end.cancelled == (first,) and end.attempts == 2
    # the loser's load is released, with no health penalty, and the call's slot is free
    assert in_flight(dest) == {key(first): 0, key(second): 0}
    assert dest.health.slot(key(first)).failures == 0
    assert dest.inflight == 0


def test_first_answer_before_the_timer_means_no_hedge():
    dest = make_dest(2)
    d = Drive(dest)
    d.done(d.action, OK)
    assert d.end is not None and d.end.result is OK and d.end.cancelled == ()
    assert d.end.attempts == 1 and d.obs.retries == []


def test_max_extra_copies_each_after_its_own_timer_then_wait():
    dest = make_dest(4, raw=hedge_policy(max_extra=2))
    d = Drive(dest)
    a1 = d.action
    a2 = d.hedge()
    assert a2.hedge_after == pytest.approx(0.05)  # one more allowed: timer re-armed
    a3 = d.hedge()
    assert a3.hedge_after is None
    assert len({key(a1), key(a2), key(a3)}) == 3
    assert d.hedge() is WAIT  # max_extra reached
    assert d.obs.retries == [HEDGE_REASON, HEDGE_REASON]
    d.done(a1, OK)  # the original may still win
    assert d.end is not None and d.end.result is OK and set(d.end.cancelled) == {a2, a3}
    assert sum(in_flight(dest).values()) == 0


def test_non_retryable_answer_is_final_and_cancels_the_rest():
    dest = make_dest(2)
    d = Drive(dest)
    a1 = d.action
    a2 = d.hedge()
    d.done(a2, R404)
    assert d.end is not None and d.end.result is R404 and d.end.cancelled == (a1,)


def test_retryable_failure_does_not_end_the_call_while_a_copy_is_in_flight():
    dest = make_dest(2)
    d = Drive(dest)
    a1 = d.action
    a2 = d.hedge()
    assert d.done(a2, R503) is WAIT  # a1 still running; no hedge left
    assert d.end is None
    d.done(a1, OK)
    assert d.end is not None and d.end.result is OK and d.end.cancelled == ()
    assert d.obs.stops == []


def test_retryable_failure_sends_the_next_hedge_at_once_when_one_is_left():
    dest = make_dest(3, raw=hedge_policy(max_extra=2, delay="1s"))
    d = Drive(dest)
    a1 = d.action
    a2 = d.hedge()
    a3 = d.done(a2, R503)  # gRPC A6: a failed hedge shortcuts the next hedge's delay
    assert isinstance(a3, Attempt) and key(a3) not in {key(a1), key(a2)}
    assert d.obs.retries == [HEDGE_REASON, HEDGE_REASON]
    d.done(a3, OK)
    assert d.end is not None and d.end.result is OK and d.end.cancelled == (a1,)


def test_all_copies_failing_falls_back_to_the_normal_retry_decision():
    dest = make_dest(3, raw=hedge_policy(retries={"attempts": 3}))
    d = Drive(dest)
    a1 = d.action
    a2 = d.hedge()
    assert d.done(a1, R503) is WAIT
    sleep = d.done(a2, R503)  # nothing in flight now: retry with backoff
    assert isinstance(sleep, Sleep) and sleep.reason == "backoff"
    assert d.obs.retries == [HEDGE_REASON, Outcome.GATEWAY_ERROR.value]
    a3 = d.slept()
    assert isinstance(a3, Attempt) and a3.number == 3
    assert key(a3) not in {key(a1), key(a2)}  # the untried endpoint
    assert a3.hedge_after is None  # max_extra used up in round 1
    d.done(a3, R503)
    assert d.end is not None and d.end.result is R503 and d.end.stopped == "attempts_exhausted"
    assert d.obs.stops == ["attempts_exhausted"]
    assert sum(in_flight(dest).values()) == 0 and dest.inflight == 0


def test_a_retry_round_may_hedge_again_while_max_extra_is_left():
    dest = make_dest(4, raw=hedge_policy(max_extra=2, retries={"attempts": 5}))
    d = Drive(dest)
    a1 = d.action
    d.done(a1, R503)  # fails before the timer: ordinary retry
    assert isinstance(d.action, Sleep)
    a2 = d.slept()
    assert a2.hedge_after == pytest.approx(0.05)
    a3 = d.hedge()
    assert isinstance(a3, Attempt) and key(a3) not in {key(a1), key(a2)}


# --------------------------------------------------------------------------- refusals


def test_budget_exhausted_stops_hedges():
    raw = hedge_policy(retries={"budget": {"percent": 0, "min_retries_per_second": 0}})
    dest = make_dest(2, raw=raw)
    d = Drive(dest)
    a1 = d.action
    assert d.hedge() is WAIT
    assert d.obs.retries == []
    assert sum(in_flight(dest).values()) == 1  # no second attempt was started
    d.done(a1, OK)
    assert d.end is not None and d.end.attempts == 1


def test_no_untried_usable_endpoint_means_no_hedge():
    clock = Clock()
    raw = hedge_policy(circuit_breaker={"failure_threshold": 1, "reset_timeout": "10s"})
    dest = make_dest(2, raw=raw, clock=clock)
    d = Drive(dest)
    a1 = d.action
    (other,) = {f"/svc/{SVC}/i0", f"/svc/{SVC}/i1"} - {key(a1)}
    # the other endpoint's breaker opens: the hedge has nowhere to go
    dest.health.record(other, Outcome.CONNECT_FAILURE, dest.health.admit(other, clock()),
                       clock())
    assert d.hedge() is WAIT
    assert d.obs.retries == []
    d.done(a1, OK)
    assert d.end is not None and d.end.result is OK and d.end.attempts == 1


def test_hedge_after_the_deadline_is_refused():
    clock = Clock()
    dest = make_dest(2, raw=hedge_policy(timeout="100ms"), clock=clock)
    d = Drive(dest)
    a1 = d.action
    clock.advance(0.2)
    assert d.hedge() is WAIT
    d.done(a1, AttemptResult(Outcome.TIMEOUT, None, "timeout"))
    assert d.end is not None and d.end.failure == FailureKind.DEADLINE


# --------------------------------------------------------------------------- releases


def test_loser_breaker_trial_slot_is_released():
    clock = Clock()
    raw = hedge_policy(circuit_breaker={"failure_threshold": 1, "reset_timeout": "1s",
                                        "half_open_max_calls": 1})
    dest = make_dest(2, raw=raw, clock=clock)
    health = dest.health
    for k in (f"/svc/{SVC}/i0", f"/svc/{SVC}/i1"):  # open both breakers, then let them reset
        health.record(k, Outcome.CONNECT_FAILURE, health.admit(k, clock()), clock())
    clock.advance(1.5)
    d = Drive(dest)
    a1 = d.action
    a2 = d.hedge()
    assert isinstance(a2, Attempt)  # both attempts hold their endpoint's only trial place
    assert health.slot(key(a1)).trials == 1 and health.slot(key(a2)).trials == 1
    d.done(a1, OK)
    assert d.end is not None and d.end.cancelled == (a2,)
    loser = health.slot(key(a2))
    assert loser.trials == 0 and loser.failures == 0  # freed, not counted as a failure
    assert health.admit(key(a2), clock()) != REJECT  # a new trial is admitted


def test_caller_going_away_releases_every_outstanding_attempt():
    dest = make_dest(3, raw=hedge_policy(max_extra=2))
    d = Drive(dest)
    d.hedge()
    d.hedge()
    assert sum(in_flight(dest).values()) == 3 and dest.inflight == 1
    d.gen.close()  # what a driver does when its caller is cancelled
    assert sum(in_flight(dest).values()) == 0 and dest.inflight == 0


def test_driver_protocol_error_names_what_was_received():
    dest = make_dest(2)
    d = Drive(dest)
    with pytest.raises(TypeError, match="expected Done or HEDGE"):
        d.gen.send(OK)  # a bare result in hedged mode
    assert dest.inflight == 0
