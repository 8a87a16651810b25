"""The destination's concurrency slots (Envoy max_requests), changed live."""

from __future__ import annotations

import threading

import pytest

from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import ServiceSnapshot


def _dest() -> DestinationState:
    return DestinationState("svc", lambda: ServiceSnapshot("svc"))


def test_slots_are_taken_and_given_back():
    d = _dest()
    d.set_limit(2)
    assert d.acquire() and d.acquire()
    assert not d.acquire()  # full
    assert d.inflight == 2
    d.release()
    assert d.inflight == 1 and d.acquire()


def test_lowering_the_limit_below_what_is_in_use_is_paid_back_by_releases():
    d = _dest()
    d.set_limit(4)
    for _ in range(3):
        assert d.acquire()
    d.set_limit(1)  # 3 in use, 1 allowed: no new call until two have ended
    assert d.inflight == 3 and not d.acquire()
    d.release()
    assert not d.acquire()  # 2 in use, limit 1
    d.release()
    assert not d.acquire()  # 1 in use, limit 1
    d.release()
    assert d.inflight == 0 and d.acquire() and not d.acquire()


def test_raising_the_limit_first_cancels_debt():
    d = _dest()
    d.set_limit(3)
    for _ in range(3):
        d.acquire()
    d.set_limit(1)  # debt 2
    d.set_limit(4)  # pays the debt, then one more free slot
    assert d.inflight == 3 and d.acquire() and not d.acquire()


def test_no_slot_is_lost_or_made_under_threads():
    d = _dest()
    d.set_limit(8)
    taken = []

    def worker() -> None:
        for _ in range(20_000):
            if d.acquire():
                taken.append(1)
                d.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.inflight == 0
    assert sum(1 for _ in range(9) if d.acquire()) == 8


# --------------------------------------------------------------------------- the plan lookup


def _policy_dest(raw: dict) -> tuple[DestinationState, dict]:
    import random

    from meshlib.config.policy import parse_policy_dict
    from meshlib.core.endpoints import Endpoint

    eps = (Endpoint("svc", "a", "127.0.0.1", 9001, key="/svc/a"),
           Endpoint("svc", "b", "127.0.0.1", 9002, key="/svc/b"))
    published = {"svc": ServiceSnapshot("svc", eps, parse_policy_dict(raw, "k"))}
    clock = [1000.0]
    d = DestinationState("svc", lambda: published["svc"], lookup=published.get,
                         now=lambda: clock[0], rng=random.Random(1))
    return d, published


def test_plan_is_compiled_once_per_published_snapshot():
    from meshlib.config.policy import parse_policy_dict

    d, published = _policy_dest({})
    p1 = d.plan()
    assert d.plan() is p1 and d.current is p1  # same snapshot: the same plan
    old = published["svc"]
    published["svc"] = ServiceSnapshot("svc", old.endpoints,
                                       parse_policy_dict({"timeout": "2s"}, "k"))
    p2 = d.plan()
    assert p2 is not p1 and p2.snapshot is published["svc"] and p2.retry.timeout == 2.0
    assert d.plan() is p2


def test_a_policy_that_turns_the_breaker_off_frees_an_open_endpoint_for_the_next_call():
    from meshlib.config.policy import parse_policy_dict
    from meshlib.core.outcome import Outcome

    d, published = _policy_dest({"circuit_breaker": {"failure_threshold": 1,
                                                     "reset_timeout": "10s"}})
    plan = d.plan()
    seen: list = []
    d.observer = type("Obs", (), {"health": lambda self, ev: seen.extend(ev)})()
    now = d.now()
    d.health.record("/svc/a", Outcome.GATEWAY_ERROR, d.health.admit("/svc/a", now), now)
    assert not d.health.usable("/svc/a", now)
    assert {plan.balancer.pick(plan.router.default.endpoints).key for _ in range(20)} == {
        "/svc/b"}
    published["svc"] = ServiceSnapshot(
        "svc", published["svc"].endpoints,
        parse_policy_dict({"circuit_breaker": {"enabled": False}}, "k"))
    plan = d.plan()
    assert [(e.kind.value, e.key) for e in seen] == [("breaker_closed", "/svc/a")]
    assert {plan.balancer.pick(plan.router.default.endpoints).key for _ in range(50)} == {
        "/svc/a", "/svc/b"}


def test_a_raising_breaker_listener_is_logged_and_the_others_still_hear(caplog):
    from meshlib.core.health import EventKind, HealthEvent

    d, _ = _policy_dest({})
    d.plan()
    heard: list = []

    class Bad:
        def state_change(self, cb, old, new):
            raise RuntimeError("listener bug")

    class Good:
        def state_change(self, cb, old, new):
            heard.append((old.name, new.name))

    d.breaker_listeners = [Bad(), Good()]
    with caplog.at_level("ERROR", logger="meshlib.core.destination"):
        d.on_health((HealthEvent(EventKind.BREAKER_OPENED, "/svc/a", 1.0),))
    assert heard == [("closed", "open")]
    (rec,) = caplog.records
    assert "breaker listener" in rec.getMessage() and rec.exc_info[0] is RuntimeError


# --------------------------------------------------------------------------- no endpoints


class _Discovery:
    def __init__(self, connected: bool, last_contact: float | None) -> None:
        self.connected = connected
        self.last_contact = last_contact


def _empty_plan(revision: int = 0, from_cache: bool = False):
    from meshlib.config.policy import DEFAULT_POLICY

    snap = ServiceSnapshot("stock", (), DEFAULT_POLICY, revision=revision, from_cache=from_cache)
    d = DestinationState("stock", lambda: snap, now=lambda: 500.0)
    return d, d.plan()


@pytest.mark.parametrize(("discovery", "revision", "from_cache", "expected"), [
    (None, 7, False, "service 'stock' has no endpoints in etcd"),
    (_Discovery(True, 499.0), 7, False, "service 'stock' has no endpoints in etcd"),
    (_Discovery(True, 499.0), 0, False, "service 'stock' has no endpoints in etcd"),
    (_Discovery(False, None), 0, False,
     "no endpoints known: etcd has not answered since the mesh started and no snapshot"),
    (_Discovery(False, 488.0), 0, False, "no endpoints known: etcd unreachable for 12.0s"),
    (_Discovery(False, 488.0), 0, True,
     "had no endpoints in the cached snapshot; etcd unreachable for 12.0s"),
    (_Discovery(False, 480.0), 9, False,
     "had no endpoints in etcd revision 9; etcd unreachable for 20.0s"),
])
def test_no_endpoints_message_says_whether_etcd_was_reachable(discovery, revision, from_cache,
                                                             expected):
    from meshlib.core.call import FailureKind, run_call

    d, plan = _empty_plan(revision, from_cache)
    d.discovery = discovery
    gen = run_call(d, plan, method="GET")
    with pytest.raises(StopIteration) as stop:
        next(gen)
    end = stop.value.value
    assert end.failure == FailureKind.NO_ENDPOINTS
    assert expected in end.message
