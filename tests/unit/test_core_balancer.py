"""Balancers: weight distribution, exclusion, load awareness, ring hash stickiness and
minimal remapping, zone preference, load stats."""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from types import SimpleNamespace

import pytest

from meshlib.config.policy import parse_policy_dict
from meshlib.core.balancer import (
    LeastRequest,
    LoadStats,
    PeakEwma,
    RandomBalancer,
    RingHash,
    RoundRobin,
    ZoneFilter,
    endpoint_key,
    hash_key_source,
    make_balancer,
)
from meshlib.core.endpoints import Endpoint
from meshlib.core.health import HealthRegistry


class Clock:
    def __init__(self, t: float = 50.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ep(i: int, weight: int = 100, zone: str | None = None) -> Endpoint:
    return Endpoint(service="svc", instance_id=f"i{i}", address=f"10.0.0.{i}", port=8080,
                    zone=zone, weight=weight, key=f"/mesh/services/svc/instances/i{i}")


ALGOS = {
    "round_robin": RoundRobin,
    "random": RandomBalancer,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwma,
    "ring_hash": RingHash,
}


def make(name: str, clock: Clock | None = None, seed: int = 1, health=None, stats=None):
    clock = clock or Clock()
    stats = stats or LoadStats(clock)
    return ALGOS[name](stats, rng=random.Random(seed), now=clock, health=health)


def shares(balancer, eps, n: int, **kw) -> dict[str, float]:
    c = Counter(balancer.pick(eps, **kw).instance_id for _ in range(n))
    return {k: v / n for k, v in c.items()}


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize(
    ("algo", "weights", "tolerance"),
    [
        ("round_robin", (100, 100, 100, 100), 0.001),
        ("round_robin", (100, 200, 300), 0.001),
        ("random", (100, 100, 100, 100), 0.02),
        ("random", (100, 200, 300), 0.02),
        ("least_request", (100, 100, 100, 100), 0.02),
        ("least_request", (100, 200, 300), 0.001),  # weighted: EDF, exact at zero load
        ("peak_ewma", (100, 100, 100, 100), 0.02),
        ("peak_ewma", (100, 200, 300), 0.02),
        ("ring_hash", (100, 100, 100, 100), 0.06),  # random keys: arc lengths vary
        ("ring_hash", (100, 200, 300), 0.06),
    ],
)
def test_weights_are_honoured_at_zero_load(algo, weights, tolerance):
    eps = tuple(ep(i, w) for i, w in enumerate(weights))
    got = shares(make(algo), eps, 12000)
    total = sum(weights)
    for i, w in enumerate(weights):
        assert got.get(f"i{i}", 0.0) == pytest.approx(w / total, abs=tolerance), got


def test_round_robin_rotates_evenly_and_interleaves():
    eps = tuple(ep(i) for i in range(4))
    b = make("round_robin")
    first = [b.pick(eps).instance_id for _ in range(8)]
    assert sorted(first[:4]) == ["i0", "i1", "i2", "i3"]
    assert first[4:] == first[:4]
    weighted = tuple(ep(i, w) for i, w in enumerate((100, 300)))
    seq = [b.pick(weighted).instance_id for _ in range(8)]
    assert seq.count("i1") == 6
    assert "i0i0" not in "".join(seq)  # smooth: the light one is never picked twice in a row


def test_round_robin_start_is_randomised_between_clients():
    eps = tuple(ep(i) for i in range(8))
    firsts = {make("round_robin", seed=s).pick(eps).instance_id for s in range(40)}
    assert len(firsts) > 3


# --------------------------------------------------------------------------- exclusion


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_exclusion_is_honoured(algo):
    eps = tuple(ep(i, 100 + 50 * (i % 2)) for i in range(5))
    b = make(algo)
    exclude = {eps[0].key, eps[3].key}
    for k in range(500):
        picked = b.pick(eps, exclude=exclude, hash_key=f"user-{k}")
        assert picked is not None and picked.key not in exclude


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_all_excluded_gives_none(algo):
    eps = tuple(ep(i) for i in range(3))
    b = make(algo)
    assert b.pick(eps, exclude={e.key for e in eps}, hash_key="k") is None
    assert b.pick((), hash_key="k") is None
    # and the balancer still works afterwards (EDF entries were put back)
    assert {b.pick(eps).key for _ in range(60)} == {e.key for e in eps}


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_single_remaining_endpoint_is_found(algo):
    eps = tuple(ep(i) for i in range(6))
    b = make(algo)
    exclude = {e.key for e in eps[:-1]}
    for k in range(50):
        assert b.pick(eps, exclude=exclude, hash_key=str(k)) is eps[-1]


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_blocked_endpoints_in_health_are_skipped(algo):
    clock = Clock()
    health = HealthRegistry(None, None, clock)
    eps = tuple(ep(i) for i in range(4))
    b = make(algo, clock=clock, health=health)
    health.slot(eps[1].key).blocked_until = clock.t + 10
    for k in range(300):
        assert b.pick(eps, hash_key=str(k)) is not eps[1]
    clock.t += 10  # block over: it comes back
    assert eps[1] in {b.pick(eps, hash_key=str(k)) for k in range(300)}


# --------------------------------------------------------------------------- load aware


def test_p2c_least_request_avoids_the_loaded_endpoint():
    clock = Clock()
    stats = LoadStats(clock)
    eps = tuple(ep(i) for i in range(3))
    b = make("least_request", clock=clock, stats=stats)
    stats.slot(eps[0].key).in_flight = 10
    stats.slot(eps[1].key).in_flight = 1
    got = shares(b, eps, 3000)
    # any pair that includes i0 contains a less loaded endpoint
    assert "i0" not in got
    # i2 (idle) wins every pair it is in: 2 of 3 pairs
    assert got["i2"] == pytest.approx(2 / 3, abs=0.03)


def test_weighted_least_request_uses_envoy_formula():
    clock = Clock()
    stats = LoadStats(clock)
    eps = (ep(0, 100), ep(1, 200))
    b = make("least_request", clock=clock, stats=stats)
    # effective weights: 100/(0+1) = 100 vs 200/(3+1) = 50 -> 2:1 for i0
    stats.slot(eps[1].key).in_flight = 3
    got = shares(b, eps, 3000)
    assert got["i0"] == pytest.approx(2 / 3, abs=0.01)


def test_in_flight_accounting_through_start_finish():
    clock = Clock()
    stats = LoadStats(clock)
    e = ep(1)
    start = stats.start(e)
    stats.start(e)
    assert stats.get(e.key).in_flight == 2
    clock.t += 0.5
    stats.finish(e, start, clock.t, ok=True)
    assert stats.get(e.key).in_flight == 1
    stats.finish(ep(99), start, clock.t, ok=True)  # unknown endpoint: ignored


def test_peak_ewma_update_rules():
    clock = Clock()
    stats = LoadStats(clock, default_rtt=0.03, decay=10.0)
    s = stats.slot("k")
    assert s.ewma == 0.03
    stats.observe(s, 0.5, clock.t)
    assert s.ewma == 0.5  # peak: a higher sample replaces the estimate
    clock.t += 10.0
    stats.observe(s, 0.1, clock.t)  # lower: averaged with weight 1 - e^-1
    w = math.exp(-1)
    assert s.ewma == pytest.approx(0.5 * w + 0.1 * (1 - w))
    before = s.ewma
    stats.observe(s, 0.0001, clock.t, ok=False)  # a fast failure does not lower it
    assert s.ewma == pytest.approx(before)
    # cost decays toward zero with time since the last sample, and scales with in-flight
    s.in_flight = 1
    assert stats.cost(s, clock.t) == pytest.approx(before * 2)
    assert stats.cost(s, clock.t + 10.0) == pytest.approx(before * 2 * math.exp(-1))


def test_peak_ewma_prefers_the_faster_endpoint():
    clock = Clock()
    stats = LoadStats(clock, default_rtt=0.03, decay=10.0)
    eps = tuple(ep(i) for i in range(3))
    latency = {"i0": 0.200, "i1": 0.010, "i2": 0.050}
    b = make("peak_ewma", clock=clock, stats=stats)
    counts: Counter[str] = Counter()
    for _ in range(3000):
        e = b.pick(eps)
        start = stats.start(e)
        clock.t += 0.002
        stats.finish(e, start - latency[e.instance_id], clock.t, ok=True)
        counts[e.instance_id] += 1
    assert counts["i1"] > counts["i2"] > counts["i0"]
    assert counts["i1"] > 0.5 * 3000


def test_load_stats_survive_snapshot_swap_and_prune():
    clock = Clock()
    stats = LoadStats(clock)
    eps = tuple(ep(i) for i in range(3))
    make("least_request", clock=clock, stats=stats).pick(eps)
    stats.slot(eps[0].key).in_flight = 7
    new_eps = (eps[0], eps[1], ep(5))  # a new snapshot: i2 left, i5 joined
    b2 = make("least_request", clock=clock, stats=stats)
    b2.pick(new_eps)
    assert stats.get(eps[0].key).in_flight == 7
    removed = stats.prune(e.key for e in new_eps)
    assert removed == [eps[2].key]
    assert stats.keys() == {e.key for e in new_eps}


# --------------------------------------------------------------------------- ring hash


def test_ring_hash_is_sticky_across_balancer_instances():
    eps = tuple(ep(i) for i in range(10))
    b1, b2 = make("ring_hash", seed=1), make("ring_hash", seed=2)
    for k in range(500):
        key = f"user-{k}"
        first = b1.pick(eps, hash_key=key)
        assert all(b1.pick(eps, hash_key=key) is first for _ in range(3))
        assert b2.pick(eps, hash_key=key) == first


def test_ring_hash_ring_size_and_weights():
    b = make("ring_hash")
    eps = tuple(ep(i, w) for i, w in enumerate((100, 100, 300)))
    hashes, owners = b.group(eps).state
    assert len(hashes) >= 1024
    c = Counter(owners)
    assert c[2] == 3 * c[0] == 3 * c[1]
    assert list(hashes) == sorted(hashes)


@pytest.mark.parametrize("removed", [0, 4, 9])
def test_ring_hash_minimal_remap_on_removal(removed):
    eps = tuple(ep(i) for i in range(10))
    after = tuple(e for i, e in enumerate(eps) if i != removed)
    b = make("ring_hash")
    keys = [f"session-{k}" for k in range(5000)]
    before_map = {k: b.pick(eps, hash_key=k) for k in keys}
    after_map = {k: b.pick(after, hash_key=k) for k in keys}
    moved = [k for k in keys if before_map[k] != after_map[k]]
    # only keys of the removed endpoint move ...
    assert all(before_map[k] is eps[removed] for k in moved)
    # ... and all of them do; that is about a tenth of the keys
    assert len(moved) == sum(1 for k in keys if before_map[k] is eps[removed])
    assert 0.05 < len(moved) / len(keys) < 0.15


def test_ring_hash_addition_only_moves_keys_to_the_new_endpoint():
    eps = tuple(ep(i) for i in range(9))
    grown = (*eps, ep(9))
    b = make("ring_hash")
    keys = [f"k{k}" for k in range(5000)]
    moved = [k for k in keys if b.pick(eps, hash_key=k) != b.pick(grown, hash_key=k)]
    assert all(b.pick(grown, hash_key=k) == grown[-1] for k in moved)
    assert 0.05 < len(moved) / len(keys) < 0.15


def test_ring_hash_walks_to_next_distinct_allowed_endpoint():
    eps = tuple(ep(i) for i in range(5))
    b = make("ring_hash")
    for k in range(200):
        key = f"u{k}"
        owner = b.pick(eps, hash_key=key)
        alt = b.pick(eps, exclude={owner.key}, hash_key=key)
        assert alt is not None and alt is not owner
        # deterministic: the same fallback every time (sticky even while excluded)
        assert b.pick(eps, exclude={owner.key}, hash_key=key) is alt


# --------------------------------------------------------------------------- zones


def zoned() -> tuple[Endpoint, ...]:
    return (ep(0, zone="a"), ep(1, zone="a"), ep(2, zone="a"), ep(3, zone="a"),
            ep(4, zone="b"), ep(5, zone="b"))


@pytest.mark.parametrize(
    ("blocked", "min_pct", "expect_local"),
    [
        ((), 50, True),
        ((0,), 50, True),  # 3 of 4 healthy = 75 %
        ((0, 1), 50, True),  # 50 % is enough
        ((0, 1, 2), 50, False),  # 25 %: spill over to all zones
        ((0, 1, 2, 3), 0, False),  # none healthy: always spill
        ((0, 1, 2), 20, True),
        ((4, 5), 50, True),  # other zone's health is irrelevant
    ],
)
def test_zone_preference_and_spill_over(blocked, min_pct, expect_local):
    clock = Clock()
    health = HealthRegistry(None, None, clock)
    eps = zoned()
    for i in blocked:
        health.slot(eps[i].key).blocked_until = clock.t + 5
    zf = ZoneFilter("a", min_pct, health)
    got = zf.select(eps, clock.t)
    if expect_local:
        assert {e.zone for e in got} == {"a"} and len(got) == 4
    else:
        assert got is eps
    assert zf.select(eps, clock.t) == got  # cached local tuple gives the same answer


@pytest.mark.parametrize(
    ("zone", "enabled", "expected"),
    [(None, True, 6), ("c", True, 6), ("a", False, 6), ("b", True, 2)],
)
def test_zone_filter_passthrough_cases(zone, enabled, expected):
    eps = zoned()
    got = ZoneFilter(zone, 50, None, enabled=enabled).select(eps)
    assert len(got) == expected
    if expected == 6:
        assert got is eps


def test_zone_filter_with_balancer_keeps_traffic_local():
    clock = Clock()
    eps = zoned()
    zf = ZoneFilter("b", 50, None)
    b = make("least_request", clock=clock)
    assert {b.pick(zf.select(eps, clock.t)).zone for _ in range(200)} == {"b"}


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_make_balancer_from_policy(name):
    raw = {"load_balancer": {"policy": name}}
    if name == "ring_hash":
        raw["load_balancer"]["hash_on"] = {"header": "X-User"}
        raw["load_balancer"]["ring_size"] = 256
    lb = parse_policy_dict(raw, "k").load_balancer
    clock = Clock()
    b = make_balancer(lb, LoadStats(clock), rng=random.Random(0), now=clock)
    assert isinstance(b, ALGOS[name]) and b.name == name
    if name == "ring_hash":
        assert b.ring_size == 256
        assert hash_key_source(lb) == ("header", "x-user")
    assert b.pick((ep(1),)) == ep(1)


def test_make_balancer_unknown_and_hash_sources():
    clock = Clock()
    with pytest.raises(ValueError, match="unknown algorithm 'maglev'"):
        make_balancer(SimpleNamespace(policy="maglev"), LoadStats(clock),
                      rng=random.Random(0), now=clock)
    assert hash_key_source(SimpleNamespace(hash_on=None)) is None
    assert hash_key_source(SimpleNamespace(hash_on=SimpleNamespace(header=None,
                                                                   cookie="sid"))) == (
        "cookie", "sid")


def test_endpoint_key_fallback_for_keyless_endpoints():
    e = Endpoint(service="s", instance_id="x", address="::1", port=1)
    assert endpoint_key(e) == "s/x@::1:1"
    assert endpoint_key(ep(3)) == ep(3).key


@pytest.mark.parametrize("algo", ["round_robin", "least_request"])
def test_concurrent_picks_never_see_a_half_updated_schedule(algo):
    eps = (ep(0, 100), ep(1, 300)) if algo == "least_request" else (ep(0),)
    b = make(algo)
    misses: list[int] = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        n = sum(1 for _ in range(2000) if b.pick(eps) is None)
        misses.append(n)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert misses == [0] * 8
    assert len(b.group(eps).state) == len(eps)  # every schedule entry was put back


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_a_single_candidate_is_picked_unless_excluded_or_blocked(algo):
    """One candidate skips the balancing step (as Envoy does for one host); exclusion and
    health still apply, and alternating candidate tuples keep their own groups."""
    clock = Clock()
    health = HealthRegistry(None, None, clock)
    one = (ep(1),)
    two = (ep(2), ep(3))
    b = make(algo, clock=clock, health=health)
    for k in range(20):
        assert b.pick(one, hash_key=str(k)) is one[0]
        assert b.pick(two, hash_key=str(k)) in two  # switching groups back and forth
    assert b.pick(one, exclude={one[0].key}) is None
    health.slot(one[0].key).blocked_until = clock.t + 5
    assert b.pick(one) is None
    clock.t += 5
    assert b.pick(one) is one[0]
    assert b.pick((), hash_key="k") is None
