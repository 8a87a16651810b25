"""Circuit breaker state machine and Envoy-style outlier ejection, with a fake clock."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pybreaker
import pytest

from meshlib.config.policy import parse_policy_dict
from meshlib.core.breaker_mirror import pybreaker_mirror, sync_mirror
from meshlib.core.health import (
    ADMIT,
    CLOSED,
    FIRST_TRIAL,
    HALF_OPEN,
    OPEN,
    REJECT,
    TRIAL,
    EventKind,
    HealthRegistry,
)
from meshlib.core.outcome import Outcome

OC = Outcome
K = EventKind


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def breaker_cfg(threshold=3, reset=10.0, half_open=2, enabled=True):
    return SimpleNamespace(enabled=enabled, failure_threshold=threshold,
                           reset_timeout=reset, half_open_max_calls=half_open)


def outlier_cfg(c5xx=5, cgw=5, interval=10.0, base=30.0, max_time=300.0, max_pct=10,
                always_one=False):
    return SimpleNamespace(enabled=True, consecutive_5xx=c5xx, consecutive_gateway_failure=cgw,
                           interval=interval, base_ejection_time=base,
                           max_ejection_time=max_time, max_ejection_percent=max_pct,
                           always_eject_one_host=always_one)


def kinds(events) -> list[EventKind]:
    return [e.kind for e in events]


def call(reg: HealthRegistry, key: str, outcome: Outcome, now: float):
    """One attempt: admission, then its result. Returns (admission, events)."""
    adm = reg.admit(key, now)
    if adm == REJECT:
        return adm, ()
    return adm, reg.record(key, outcome, adm, now)


# --------------------------------------------------------------------------- breaker

# Steps: (advance seconds, outcome or "admit", expected admission, expected events,
#         expected state after)
BREAKER_SCRIPT = [
    (0, OC.GATEWAY_ERROR, ADMIT, [], CLOSED),
    (0, OC.HTTP_5XX, ADMIT, [], CLOSED),
    (0, OC.SUCCESS, ADMIT, [], CLOSED),  # success resets the consecutive count
    (0, OC.RESET, ADMIT, [], CLOSED),
    (0, OC.HTTP_4XX, ADMIT, [], CLOSED),  # 4xx proves the endpoint works: resets too
    (0, OC.TIMEOUT, ADMIT, [], CLOSED),
    (0, OC.LOCAL, ADMIT, [], CLOSED),  # neutral: neither counts nor resets
    (0, OC.CONNECT_FAILURE, ADMIT, [], CLOSED),
    (0, OC.GATEWAY_ERROR, ADMIT, [K.BREAKER_OPENED], OPEN),  # third consecutive failure
    (5, OC.SUCCESS, REJECT, [], OPEN),  # still open
    (5, OC.GATEWAY_ERROR, FIRST_TRIAL, [K.BREAKER_HALF_OPEN, K.BREAKER_OPENED], OPEN),
    (9.9, OC.SUCCESS, REJECT, [], OPEN),  # the reset timeout restarted at the re-open
    (0.1, OC.SUCCESS, FIRST_TRIAL, [K.BREAKER_HALF_OPEN, K.BREAKER_CLOSED], CLOSED),
    (0, OC.GATEWAY_ERROR, ADMIT, [], CLOSED),
]


def test_breaker_state_machine_script():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(), None, clock)
    reg.prune(["a"])
    for step, (dt, outcome, adm, evs, state) in enumerate(BREAKER_SCRIPT):
        clock.t += dt
        got_adm, got_events = call(reg, "a", outcome, clock.t)
        assert (got_adm, kinds(got_events), reg.state("a")) == (adm, evs, state), step


def test_breaker_opened_event_carries_details_and_blocks_endpoint():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=2, reset=7.0), None, clock)
    reg.prune(["a"])
    call(reg, "a", OC.GATEWAY_ERROR, clock.t)
    _, events = call(reg, "a", OC.GATEWAY_ERROR, clock.t)
    (ev,) = events
    assert (ev.kind, ev.key, ev.at, ev.duration_s, ev.count, ev.reason) == (
        K.BREAKER_OPENED, "a", clock.t, 7.0, 2, "consecutive_failures")
    assert not reg.usable("a", clock.t + 6.9)
    assert reg.usable("a", clock.t + 7.0)  # due for a trial: the balancer may pick it


def test_half_open_admits_at_most_max_concurrent_trials():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=1, reset=1.0, half_open=2), None, clock)
    reg.prune(["a"])
    call(reg, "a", OC.RESET, clock.t)
    clock.t += 1.0
    admissions = [reg.admit("a", clock.t) for _ in range(5)]  # none has finished yet
    assert admissions == [FIRST_TRIAL, TRIAL, REJECT, REJECT, REJECT]
    assert reg.state("a") == HALF_OPEN
    assert not reg.usable("a", clock.t + 1000)  # full: the balancer skips it
    # a trial abandoned without a result frees its place
    assert reg.release("a", TRIAL, clock.t) == ()
    assert reg.usable("a", clock.t)
    assert reg.admit("a", clock.t) == TRIAL
    assert reg.admit("a", clock.t) == REJECT
    assert kinds(reg.record("a", OC.SUCCESS, TRIAL, clock.t)) == [K.BREAKER_CLOSED]
    assert reg.admit("a", clock.t) == ADMIT


def test_half_open_cap_holds_under_threads():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=1, reset=1.0, half_open=3), None, clock)
    reg.prune(["a"])
    call(reg, "a", OC.RESET, clock.t)
    clock.t += 1.0
    barrier = threading.Barrier(16)
    results: list[int] = []
    lock = threading.Lock()

    def worker():
        barrier.wait()
        adm = reg.admit("a", clock.t)
        with lock:
            results.append(adm)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r in (TRIAL, FIRST_TRIAL) for r in results) == 3
    assert results.count(FIRST_TRIAL) == 1


def test_results_of_calls_admitted_before_opening_are_ignored():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=1, reset=5.0), None, clock)
    reg.prune(["a"])
    early = reg.admit("a", clock.t)
    call(reg, "a", OC.RESET, clock.t)  # opens
    assert reg.record("a", OC.SUCCESS, early, clock.t) == ()
    assert reg.state("a") == OPEN


def test_breaker_disabled_always_admits():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(enabled=False), None, clock)
    reg.prune(["a"])
    for _ in range(20):
        assert call(reg, "a", OC.RESET, clock.t) == (ADMIT, ())
    assert reg.usable("a", clock.t)


# --------------------------------------------------------------------------- outlier


def fail_n(reg, key, n, clock, outcome=OC.GATEWAY_ERROR):
    events = []
    for _ in range(n):
        events.extend(reg.record(key, outcome, ADMIT, clock.t))
    return events


def ten(reg: HealthRegistry) -> list[str]:
    keys = [f"e{i}" for i in range(10)]
    reg.prune(keys)
    return keys


def test_consecutive_5xx_ejects_and_blocks():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=5, cgw=100), clock)
    ten(reg)
    assert fail_n(reg, "e0", 4, clock, OC.HTTP_5XX) == []
    (ev,) = fail_n(reg, "e0", 1, clock, OC.HTTP_5XX)
    assert (ev.kind, ev.reason, ev.duration_s, ev.count) == (K.EJECTED, "consecutive_5xx",
                                                             30.0, 1)
    assert not reg.usable("e0", clock.t + 29.9)
    assert reg.usable("e0", clock.t + 30.0)  # lazily over when the time has passed


@pytest.mark.parametrize(
    ("sequence", "ejected"),
    [
        ([OC.HTTP_5XX] * 4 + [OC.SUCCESS] + [OC.HTTP_5XX] * 4, False),  # success resets
        ([OC.HTTP_5XX] * 4 + [OC.HTTP_4XX] + [OC.HTTP_5XX] * 4, False),  # so does a 4xx
        ([OC.HTTP_5XX] * 4 + [OC.LOCAL] + [OC.HTTP_5XX], True),  # LOCAL is neutral
        ([OC.CONNECT_FAILURE, OC.RESET, OC.TIMEOUT, OC.REFUSED_STREAM, OC.HTTP_5XX], True),
    ],
)
def test_consecutive_5xx_counting_table(sequence, ejected):
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=5, cgw=100), clock)
    ten(reg)
    events = [e for o in sequence for e in reg.record("e0", o, ADMIT, clock.t)]
    assert (K.EJECTED in kinds(events)) is ejected


def test_gateway_failure_counter_is_reset_by_other_5xx():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=100, cgw=3), clock)
    ten(reg)
    seq = [OC.GATEWAY_ERROR, OC.GATEWAY_ERROR, OC.HTTP_5XX, OC.GATEWAY_ERROR, OC.GATEWAY_ERROR]
    assert [e for o in seq for e in reg.record("e0", o, ADMIT, clock.t)] == []
    (ev,) = reg.record("e0", OC.CONNECT_FAILURE, ADMIT, clock.t)  # local origin: gateway
    assert (ev.kind, ev.reason) == (K.EJECTED, "consecutive_gateway_failure")


def test_ejection_time_multiplies_and_caps():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=1, base=30.0, max_time=100.0), clock)
    ten(reg)
    durations = []
    for i in range(6):
        events = fail_n(reg, "e0", 1, clock)
        # coming back is reported along with the next ejection
        assert kinds(events) == ([K.UNEJECTED] if i else []) + [K.EJECTED]
        ev = events[-1]
        durations.append(ev.duration_s)
        clock.t += ev.duration_s  # fails again right after coming back
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0, 100.0]


def test_ejection_multiplier_decrements_per_healthy_interval():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=1, base=30.0, max_time=300.0, interval=10.0),
                         clock)
    ten(reg)
    for expected in (30.0, 60.0, 90.0):
        ev = fail_n(reg, "e0", 1, clock)[-1]
        assert ev.kind is K.EJECTED and ev.duration_s == expected
        clock.t += ev.duration_s
    clock.t += 25.0  # two full healthy intervals: multiplier 3 -> 1, then +1 for this one
    (ev,) = [e for e in fail_n(reg, "e0", 1, clock) if e.kind is K.EJECTED]
    assert ev.duration_s == 60.0
    clock.t += 60.0 + 1000.0  # long healthy: back to the base time
    (ev,) = [e for e in fail_n(reg, "e0", 1, clock) if e.kind is K.EJECTED]
    assert ev.duration_s == 30.0


@pytest.mark.parametrize(
    ("n_endpoints", "max_pct", "always_one", "max_ejected"),
    [
        (10, 10, False, 1),
        (10, 20, False, 2),
        (10, 0, False, 0),
        (10, 100, False, 10),
        (5, 10, False, 0),  # Envoy: fewer than 10 hosts at 10 % ejects nothing ...
        (5, 10, True, 1),  # ... unless always_eject_one_host
        (3, 50, False, 1),
        (20, 10, False, 2),
    ],
)
def test_max_ejection_percent(n_endpoints, max_pct, always_one, max_ejected):
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=2, max_pct=max_pct, always_one=always_one),
                         clock)
    keys = [f"e{i}" for i in range(n_endpoints)]
    reg.prune(keys)
    events = []
    for _ in range(3):
        for k in keys:
            events.extend(reg.record(k, OC.GATEWAY_ERROR, ADMIT, clock.t))
    assert kinds(events).count(K.EJECTED) == max_ejected
    assert reg.ejected_count(clock.t) == max_ejected
    skipped = [e for e in events if e.kind is K.EJECTION_SKIPPED]
    # refused ejections are reported once per failing endpoint, not on every failure
    assert len(skipped) == n_endpoints - max_ejected
    assert len({e.key for e in skipped}) == len(skipped)


def test_refused_ejection_happens_once_room_frees_up():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=1, base=30.0), clock)
    ten(reg)
    assert kinds(fail_n(reg, "e0", 1, clock)) == [K.EJECTED]
    assert kinds(fail_n(reg, "e1", 1, clock)) == [K.EJECTION_SKIPPED]
    assert fail_n(reg, "e1", 1, clock) == []  # no repeat report in the same streak
    clock.t += 30.0  # e0 comes back
    assert kinds(fail_n(reg, "e1", 1, clock)) == [K.EJECTED]


def test_unejected_event_is_reported_lazily_by_record():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=1, max_pct=100), clock)
    ten(reg)
    fail_n(reg, "e2", 1, clock)
    assert reg.sweep(clock.t + 29) == ()
    clock.t += 30.0
    events = reg.record("e2", OC.SUCCESS, ADMIT, clock.t)
    assert kinds(events) == [K.UNEJECTED] and events[0].key == "e2"
    assert reg.sweep(clock.t) == ()  # already reported


def test_sweep_reports_each_unejection_once():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=1, max_pct=100), clock)
    ten(reg)
    fail_n(reg, "e0", 1, clock)
    fail_n(reg, "e1", 1, clock)
    clock.t += 30.0
    assert sorted(e.key for e in reg.sweep(clock.t)) == ["e0", "e1"]
    assert reg.sweep(clock.t) == ()


def test_real_policy_models_and_configure_keeps_state():
    clock = Clock()
    policy = parse_policy_dict({"circuit_breaker": {"failure_threshold": 2}}, "k")
    reg = HealthRegistry(policy.circuit_breaker, policy.outlier_detection, clock)
    keys = [f"e{i}" for i in range(10)]
    reg.prune(keys)
    call(reg, "e0", OC.RESET, clock.t)
    reg.configure(policy.circuit_breaker, None)  # outlier detection switched off
    _, events = call(reg, "e0", OC.RESET, clock.t)
    assert kinds(events) == [K.BREAKER_OPENED]
    assert reg.prune(keys[1:]) == ["e0"] and len(reg) == 9


# --------------------------------------------------------------------------- pybreaker


class Recorder(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.changes: list[tuple[str | None, str]] = []

    def state_change(self, cb, old_state, new_state) -> None:
        self.changes.append((old_state.name if old_state else None, new_state.name))


def test_pybreaker_mirror_reports_our_transitions_to_listeners():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=2, reset=5.0, half_open=1), None, clock)
    reg.prune(["a"])
    rec = Recorder()
    pb = pybreaker_mirror(reg, "a", listeners=[rec], name="orders/a")
    assert isinstance(pb, pybreaker.CircuitBreaker) and pb.name == "orders/a"
    assert pb.current_state == "closed"
    call(reg, "a", OC.RESET, clock.t)
    assert pb.fail_counter == 1
    call(reg, "a", OC.RESET, clock.t)
    assert sync_mirror(pb) == "open" and pb.current_state == pybreaker.STATE_OPEN
    assert pb.fail_max == 2 and pb.reset_timeout == 5.0
    clock.t += 5.0
    adm = reg.admit("a", clock.t)
    assert sync_mirror(pb) == "half-open"
    reg.record("a", OC.SUCCESS, adm, clock.t)
    assert sync_mirror(pb) == "closed"
    assert rec.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]
    assert sync_mirror(pb) == "closed" and len(rec.changes) == 3  # no spurious repeats


# --------------------------------------------------------------------------- external verdicts


def test_mark_unhealthy_holds_an_endpoint_out_until_its_time_or_mark_healthy():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=1, reset=5.0, half_open=1), None, clock)
    reg.prune(["a", "b"])
    reg.mark_unhealthy("a", clock.t + 30)
    assert not reg.usable("a", clock.t) and reg.unhealthy("a", clock.t)
    assert reg.usable("a", clock.t + 30)  # the hold ends at its time
    reg.mark_unhealthy("a", clock.t + 10)  # an earlier time does not shorten it
    assert not reg.usable("a", clock.t + 20)
    reg.mark_healthy("a")
    assert reg.usable("a", clock.t) and not reg.unhealthy("a", clock.t)
    reg.mark_unhealthy("nope", clock.t + 5)  # unknown keys are ignored
    reg.mark_healthy("nope")
    assert len(reg) == 2


def test_breaker_transitions_keep_an_outside_unhealthy_hold():
    """The bug this entry fixes: a breaker closing recomputed ``blocked_until`` from breaker
    and ejection state alone and put an endpoint an active check had failed back in traffic."""
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=1, reset=5.0, half_open=1), None, clock)
    reg.prune(["a"])
    reg.record("a", OC.GATEWAY_ERROR, reg.admit("a", clock.t), clock.t)  # opens
    reg.mark_unhealthy("a", clock.t + 60)
    clock.t += 6
    adm = reg.admit("a", clock.t)  # a trial (the driver chose it anyway)
    assert adm == FIRST_TRIAL
    assert kinds(reg.record("a", OC.SUCCESS, adm, clock.t))[-1] is K.BREAKER_CLOSED
    assert reg.state("a") == CLOSED
    assert not reg.usable("a", clock.t)  # still held by the outside verdict
    reg.mark_healthy("a")
    assert reg.usable("a", clock.t)


def test_mark_healthy_keeps_a_breaker_or_ejection_in_force():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=1, reset=5.0), outlier_cfg(c5xx=1, max_pct=100),
                         clock)
    reg.prune(["a", "b"])
    reg.record("a", OC.HTTP_5XX, reg.admit("a", clock.t), clock.t)  # opens and ejects
    reg.mark_unhealthy("a", clock.t + 1)
    reg.mark_healthy("a")
    assert not reg.usable("a", clock.t + 2)  # ejection (30 s) and breaker (5 s) still apply


# --------------------------------------------------------------------------- policy changes


def test_turning_the_breaker_off_closes_an_open_breaker_at_once():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=1, reset=10.0), None, clock)
    reg.prune(["a"])
    reg.record("a", OC.GATEWAY_ERROR, reg.admit("a", clock.t), clock.t)
    assert reg.state("a") == OPEN and not reg.usable("a", clock.t)
    events = reg.configure(breaker_cfg(enabled=False), None)
    assert [(e.kind, e.key, e.reason) for e in events] == [
        (K.BREAKER_CLOSED, "a", "policy_changed")]
    assert reg.state("a") == CLOSED and reg.usable("a", clock.t)
    assert reg.admit("a", clock.t) == ADMIT
    # and back on: a fresh breaker (no failures carried over)
    assert reg.configure(breaker_cfg(threshold=2), None) == ()
    reg.record("a", OC.GATEWAY_ERROR, reg.admit("a", clock.t), clock.t)
    assert reg.state("a") == CLOSED


def test_a_shorter_reset_timeout_applies_to_a_breaker_already_open():
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=1, reset=60.0), None, clock)
    reg.prune(["a"])
    reg.record("a", OC.GATEWAY_ERROR, reg.admit("a", clock.t), clock.t)
    clock.t += 3
    assert reg.configure(breaker_cfg(threshold=1, reset=2.0), None) == ()
    assert reg.usable("a", clock.t)  # opened 3 s ago, the new reset_timeout is 2 s
    assert reg.admit("a", clock.t) == FIRST_TRIAL


def test_turning_outlier_detection_off_ends_ejections_and_counters():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=2, max_pct=100), clock)
    reg.prune(["a", "b"])
    for _ in range(2):
        reg.record("a", OC.HTTP_5XX, ADMIT, clock.t)
    reg.record("b", OC.HTTP_5XX, ADMIT, clock.t)
    assert not reg.usable("a", clock.t)
    events = reg.configure(None, SimpleNamespace(enabled=False))
    assert [(e.kind, e.key) for e in events] == [(K.UNEJECTED, "a")]
    assert reg.usable("a", clock.t) and reg.ejected_count(clock.t) == 0
    assert reg.get("b").c5xx == 0 and reg.get("b").quiet


def test_a_lower_max_ejection_time_shortens_a_running_ejection():
    clock = Clock()
    reg = HealthRegistry(None, outlier_cfg(c5xx=1, base=30.0, max_time=300.0, max_pct=100),
                         clock)
    reg.prune(["a"])
    reg.record("a", OC.HTTP_5XX, ADMIT, clock.t)
    clock.t += 12
    assert not reg.usable("a", clock.t)
    reg.configure(None, outlier_cfg(c5xx=1, base=10.0, max_time=10.0, max_pct=100))
    assert reg.usable("a", clock.t)
    assert kinds(reg.sweep(clock.t)) == [] and not reg.get("a").ejecting


def test_quiet_flag_follows_every_writer():
    """``HealthSlot.quiet`` is THE healthy-endpoint condition; after any sequence of
    results it equals the condition computed from the fields."""
    import random

    rng = random.Random(3)
    clock = Clock()
    reg = HealthRegistry(breaker_cfg(threshold=3, reset=1.0, half_open=1),
                         outlier_cfg(c5xx=3, cgw=2, max_pct=50, base=1.0), clock)
    reg.prune(["a", "b"])
    outcomes = list(Outcome)
    for _ in range(5000):
        key = rng.choice("ab")
        clock.t += rng.random() * 0.3
        adm = reg.admit(key, clock.t)
        if adm != REJECT:
            reg.record(key, rng.choice(outcomes), adm, clock.t)
        if rng.random() < 0.05:
            reg.sweep(clock.t)
        for s in reg.slots.values():
            assert s.quiet == (not (s.ejecting or s.failures or s.c5xx or s.cgw
                                    or s.skip_reported)), s
