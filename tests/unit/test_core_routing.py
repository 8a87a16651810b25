"""Router (subsets, header/path routes, weighted splits) and fault injection."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from meshlib.config.policy import parse_policy_dict
from meshlib.core.endpoints import Endpoint
from meshlib.core.routing import NO_FAULT, FaultInjector, Router, subset_endpoints


def ep(i: int, version: str, **labels: str) -> Endpoint:
    return Endpoint(service="svc", instance_id=f"i{i}", address=f"10.0.1.{i}", port=80,
                    labels={"version": version, **labels}, key=f"/k/i{i}")


ENDPOINTS = (ep(0, "v1"), ep(1, "v1"), ep(2, "v2"), ep(3, "v2", track="canary"), ep(4, "v3"))


def router(raw: dict, endpoints=ENDPOINTS, **kw) -> Router:
    policy = parse_policy_dict(raw, "test")
    return Router(policy.subsets, policy.routes, endpoints, **kw)


def lookup(headers: dict[str, str]):
    low = {k.lower(): v for k, v in headers.items()}
    return low.get


SUBSETS = {"v1": {"labels": {"version": "v1"}}, "v2": {"labels": {"version": "v2"}},
           "canary": {"labels": {"version": "v2", "track": "canary"}},
           "v9": {"labels": {"version": "v9"}}}


def test_subsets_are_precomputed():
    r = router({"subsets": SUBSETS})
    assert [e.instance_id for e in r.subsets["v1"]] == ["i0", "i1"]
    assert [e.instance_id for e in r.subsets["canary"]] == ["i3"]
    assert r.subsets["v9"] == ()
    assert subset_endpoints(ENDPOINTS, {}) == ENDPOINTS


# (headers, path, expected route name, expected subset)
ROUTES = {
    "subsets": SUBSETS,
    "routes": [
        {"name": "canary-header", "match": {"headers": {"X-Canary": "true"},
                                            "path_prefix": "/api"},
         "split": [{"subset": "v2", "weight": 100}]},
        {"name": "beta-user", "match": {"headers": {"x-user": "beta", "x-tier": "gold"}},
         "split": [{"subset": "canary", "weight": 1}]},
        {"name": "legacy", "match": {"path_prefix": "/legacy"},
         "split": [{"subset": "v1", "weight": 1}]},
        {"name": "empty", "match": {"path_prefix": "/nine"},
         "split": [{"subset": "v9", "weight": 1}]},
    ],
}


@pytest.mark.parametrize(
    ("headers", "path", "route", "subset"),
    [
        ({"x-canary": "true"}, "/api/orders", "canary-header", "v2"),
        ({"X-Canary": "true"}, "/api", "canary-header", "v2"),  # names case-insensitive
        ({"x-canary": "TRUE"}, "/api/orders", None, None),  # values exact
        ({"x-canary": "true"}, "/web", None, None),  # prefix must match too
        ({}, "/api/orders", None, None),
        ({"x-user": "beta", "x-tier": "gold"}, "/", "beta-user", "canary"),
        ({"x-user": "beta"}, "/", None, None),  # all headers must match
        ({}, "/legacy/x", "legacy", "v1"),
        ({"x-canary": "true"}, "/legacy", "legacy", "v1"),
        ({}, "/nine", "empty", "v9"),
    ],
)
def test_header_and_path_routes(headers, path, route, subset):
    r = router(ROUTES)
    d = r.resolve("GET", path, lookup(headers), random.Random(0))
    assert (d.route, d.subset) == (route, subset)
    if subset is None:
        assert d.endpoints is ENDPOINTS
    else:
        assert d.endpoints == r.subsets[subset]


def test_empty_subset_gives_no_endpoints_instead_of_falling_back():
    r = router(ROUTES)
    assert r.route("GET", "/nine", lookup({}), random.Random(0)) == ()


def test_first_matching_route_wins():
    raw = {"subsets": SUBSETS, "routes": [
        {"name": "a", "match": {"path_prefix": "/"}, "split": [{"subset": "v1", "weight": 1}]},
        {"name": "b", "match": {"path_prefix": "/x"}, "split": [{"subset": "v2", "weight": 1}]},
    ]}
    assert router(raw).resolve("GET", "/x", lookup({}), random.Random(0)).route == "a"


@pytest.mark.parametrize(
    "weights",
    [{"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v1": 1, "v2": 3, None: 1},
     {"v1": 99, "v2": 1}, {"v1": 70, "v2": 0, "canary": 30}],
)
def test_weighted_split_within_two_percent(weights):
    raw = {"subsets": SUBSETS, "routes": [{"name": "split", "split": [
        {"subset": s, "weight": w} for s, w in weights.items()]}]}
    r = router(raw)
    rng = random.Random(42)
    n = 10_000
    c = Counter(r.resolve("GET", "/", lookup({}), rng).subset for _ in range(n))
    total = sum(weights.values())
    for s, w in weights.items():
        assert c[s] / n == pytest.approx(w / total, abs=0.02), (s, c)
    assert 0 not in weights.values() or c[[s for s, w in weights.items() if w == 0][0]] == 0


def test_single_destination_draws_no_random_number():
    class NoRng:
        def random(self) -> float:
            raise AssertionError("no draw expected")

    raw = {"subsets": SUBSETS, "routes": [
        {"split": [{"subset": "v1", "weight": 5}, {"subset": "v2", "weight": 0}]}]}
    d = router(raw).resolve("GET", "/", lookup({}), NoRng())  # type: ignore[arg-type]
    assert d.subset == "v1" and d.route == "routes[0]"


def test_no_routes_means_all_endpoints():
    r = Router(None, None, ENDPOINTS)
    d = r.resolve("GET", "/", lookup({}), random.Random(0))
    assert d is r.default and d.endpoints is ENDPOINTS and d.route is None


def test_build_is_applied_once_per_distinct_endpoint_tuple():
    calls = []

    def build(eps):
        calls.append(eps)
        return ("balancer", eps)

    raw = dict(ROUTES)
    raw["routes"] = [*ROUTES["routes"], {"name": "again", "match": {"path_prefix": "/again"},
                                         "split": [{"subset": "v2", "weight": 1},
                                                   {"subset": None, "weight": 1}]}]
    r = router(raw, build=build)
    assert len(calls) == len({id(c) for c in calls})  # never twice for one tuple
    d = r.resolve("GET", "/api", lookup({"x-canary": "true"}), random.Random(0))
    assert d.target == ("balancer", r.subsets["v2"])
    assert r.default.target == ("balancer", ENDPOINTS)


def test_unknown_subset_is_an_error_naming_the_field():
    routes = [SimpleNamespace(name="r", match=None,
                              split=[SimpleNamespace(subset="nope", weight=1)])]
    with pytest.raises(ValueError, match=r"routes\[0\]\.split\[0\]\.subset.*'nope'"):
        Router({}, routes, ENDPOINTS)


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("delay_pct", "duration", "abort_pct", "exp_delay", "exp_abort"),
    [
        (0, 0.0, 0, 0.0, 0.0),
        (10, 0.5, 0, 0.10, 0.0),
        (0, 0.0, 25, 0.0, 0.25),
        (50, 0.2, 50, 0.5, 0.5),
        (100, 1.0, 100, 1.0, 1.0),
        (100, 0.0, 0, 0.0, 0.0),  # a zero delay is no delay
        (0.5, 1.0, 0, 0.005, 0.0),
    ],
)
def test_fault_percentages(delay_pct, duration, abort_pct, exp_delay, exp_abort):
    policy = parse_policy_dict({"fault": {
        "delay": {"percent": delay_pct, "duration": f"{duration}s"},
        "abort": {"percent": abort_pct, "http_status": 429, "grpc_status": "RESOURCE_EXHAUSTED"},
    }}, "k")
    f = FaultInjector(policy.fault)
    rng = random.Random(9)
    n = 20_000
    results = [f.decide(rng) for _ in range(n)]
    delayed = sum(1 for d, _ in results if d > 0) / n
    aborted = sum(1 for _, a in results if a is not None) / n
    assert delayed == pytest.approx(exp_delay, abs=0.015)
    assert aborted == pytest.approx(exp_abort, abs=0.015)
    assert all(d in (0.0, duration) for d, _ in results)
    assert all(a in (None, 429) for _, a in results)
    grpc = [f.decide_grpc(rng) for _ in range(200)]
    assert all(a in (None, "resource-exhausted") for _, a in grpc)
    assert f.active is (exp_delay > 0 or exp_abort > 0)
    if not f.active:
        assert f.decide(rng) is NO_FAULT
