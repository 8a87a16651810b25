"""Hedged HTTP requests through the real stack (issue 3 section 4, ``retries.hedging``).

A real etcd (session server, a prefix per test), real threaded HTTP/1.1 upstreams on loopback
(``http_servers.Upstream``): one *slow* instance that reads the request and never answers
(mode ``hang``), one *fast* one. The slow instance is registered with the highest weight and
the balancer is ``round_robin`` (Envoy's EDF: 10,000 to 1), so a call's first attempt goes to
the slow instance; the hedge can only go to the fast one. Every case runs through
``mesh.http_client()`` and ``mesh.async_http_client()``. Counts are taken on the servers;
telemetry from prometheus_client's default registry (deltas, one service name per test).
"""

from __future__ import annotations

import select
import socket
import time
import uuid
from typing import Any

import httpx
import pytest
from http_servers import CALLERS, Upstream, eventually, register, set_policy, wait_endpoints
from prometheus_client import REGISTRY

from meshlib.mesh import Mesh

DELAY = 0.2  # hedging delay: long enough to tell "hedged" from "answered at once"


def sample(name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def hedging(**retries: Any) -> dict[str, Any]:
    """Policy: hedging after DELAY, round robin, no breaker or ejection (a test's slow
    instance must stay eligible), plus ``retries`` fields."""
    r: dict[str, Any] = {
        "backoff": {"base": "1ms", "max": "5ms"},
        "hedging": {"enabled": True, "delay": f"{int(DELAY * 1000)}ms", "max_extra": 1},
    }
    r.update(retries)
    return {
        "timeout": "10s",
        "retries": r,
        "load_balancer": {"policy": "round_robin"},
        "circuit_breaker": {"enabled": False},
        "outlier_detection": {"enabled": False},
    }


class Pair:
    """A slow (hanging, weight 10,000) and a fast (weight 1) instance of a fresh service."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.service = f"hedge-{uuid.uuid4().hex[:10]}"
        self.url = f"http://{self.service}/items"
        self.slow = Upstream("slow", mode="hang")
        self.fast = Upstream("fast")
        register(mesh, self.service, self.slow, weight=10_000)
        register(mesh, self.service, self.fast, weight=1)
        wait_endpoints(mesh, self.service, 2)

    def policy(self, **retries: Any) -> None:
        set_policy(self.mesh, self.service, hedging(**retries))

    def metric(self, name: str, **labels: str) -> float:
        return sample(name, server_address=self.service, **labels)

    def in_flight(self) -> dict[str, int]:
        stats = self.mesh.destination(self.service).stats
        keys = stats.keys()  # LoadStats.keys(): the endpoint keys it tracks
        return {k.rsplit("/", 1)[-1]: stats.slot(k).in_flight for k in keys}

    def close(self) -> None:
        self.slow.kill()
        self.fast.kill()


@pytest.fixture
def pair(mesh: Mesh):
    p = Pair(mesh)
    yield p
    p.close()


@pytest.fixture(params=["sync", "async"])
def client(request: pytest.FixtureRequest, mesh: Mesh):
    caller = CALLERS[request.param](mesh)
    yield caller
    caller.close()


def server_side_closed(up: Upstream) -> bool:
    """Whether every connection the upstream holds has been closed by the client (EOF)."""
    with up._lock:
        conns = list(up._conns)
    if not conns:
        return False
    for conn in conns:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        try:
            if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
                return False
        except OSError:
            pass  # reset by the client: closed as well
    return True


# --------------------------------------------------------------------------- the race


def test_hedge_answers_from_the_fast_instance_after_the_delay(mesh, pair, client):
    pair.policy()
    hedges = pair.metric("meshlib_client_retries_total", reason="hedge")
    cancelled = pair.metric("meshlib_client_attempt_duration_seconds_count", outcome="local")
    t0 = time.monotonic()
    resp = client.request("GET", pair.url)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 200 and resp.text == "fast"
    # the slow instance got the request first, the copy went out DELAY later
    assert pair.slow.count == 1 and pair.fast.count == 1
    gap = pair.fast.received[0].at - pair.slow.received[0].at
    assert gap >= DELAY * 0.9, gap
    assert DELAY * 0.9 <= elapsed < 5.0  # the slow one hangs for 30 s: it was not waited for
    assert pair.metric("meshlib_client_retries_total", reason="hedge") == hedges + 1
    # the abandoned attempt is recorded with outcome "local"
    assert eventually(lambda: pair.metric("meshlib_client_attempt_duration_seconds_count",
                                          outcome="local") == cancelled + 1)
    # abandoned: its connection closed, its load released, nothing held against it
    assert eventually(lambda: server_side_closed(pair.slow), 3)
    assert pair.in_flight() == {"slow": 0, "fast": 0}
    assert mesh.destination(pair.service).inflight == 0


def test_a_fast_first_answer_sends_no_hedge(mesh, client):
    svc = f"hedge-{uuid.uuid4().hex[:10]}"
    up = Upstream("only-fast")
    other = Upstream("other-fast")
    try:
        register(mesh, svc, up)
        register(mesh, svc, other)
        wait_endpoints(mesh, svc, 2)
        set_policy(mesh, svc, hedging())
        out = client.many(20, "GET", f"http://{svc}/x", concurrency=4)
        assert out.failed() == []
        assert up.count + other.count == 20  # one request per call: nothing was hedged
        assert sample("meshlib_client_retries_total", server_address=svc, reason="hedge") == 0
    finally:
        up.kill()
        other.kill()


def test_hedging_off_by_default_waits_for_the_slow_instance(mesh, pair, client):
    set_policy(mesh, pair.service, {
        "retries": {"per_try_timeout": "300ms", "attempts": 1},
        "load_balancer": {"policy": "round_robin"},
        "circuit_breaker": {"enabled": False}, "outlier_detection": {"enabled": False},
    })
    with pytest.raises(httpx.TimeoutException):
        client.request("GET", pair.url)
    assert pair.slow.count == 1 and pair.fast.count == 0


# --------------------------------------------------------------------------- refusals


def test_budget_exhaustion_stops_hedges(mesh, pair, client):
    pair.policy(per_try_timeout="300ms", attempts=1,
                budget={"percent": 0, "min_retries_per_second": 0})
    hedges = pair.metric("meshlib_client_retries_total", reason="hedge")
    with pytest.raises(httpx.TimeoutException):
        client.request("GET", pair.url)
    assert pair.slow.count == 1 and pair.fast.count == 0  # no copy was sent
    assert pair.metric("meshlib_client_retries_total", reason="hedge") == hedges


def test_every_hedge_draws_from_the_retry_budget(mesh, pair, client):
    # default budget: 20 % of calls + 10/s over 10 s; each call deposits 1, each hedge takes 1
    pair.policy()
    budget = mesh.destination(pair.service).plan().retry.budget
    assert budget is not None
    before = budget.available()
    for _ in range(2):
        assert client.request("GET", pair.url).text == "fast"
    assert budget.available() == pytest.approx(before + 2 * 0.2 - 2)
    assert pair.slow.count == 2 and pair.fast.count == 2


def test_non_idempotent_post_is_never_hedged(mesh, pair, client):
    pair.policy(per_try_timeout="300ms")
    with pytest.raises(httpx.TimeoutException):
        client.request("POST", pair.url, content=b"order")
    assert pair.slow.count == 1 and pair.fast.count == 0
    assert pair.slow.received[0].body == b"order"


def test_post_with_idempotency_key_is_hedged_when_allowed(mesh, pair, client):
    pair.policy(allow_post_with_idempotency_key=True)
    resp = client.request("POST", pair.url, content=b"order",
                          headers={"idempotency-key": "k-1"})
    assert resp.text == "fast"
    assert [r.body for r in pair.slow.received + pair.fast.received] == [b"order", b"order"]


def test_streamed_body_is_never_hedged(mesh, pair, client):
    pair.policy(per_try_timeout="300ms")
    with pytest.raises(httpx.TimeoutException):
        client.request("PUT", pair.url, content=client.stream_body([b"a", b"b"]))
    assert pair.slow.count == 1 and pair.fast.count == 0


def test_concurrent_hedged_calls_all_answer_from_the_fast_instance(mesh, pair, client):
    pair.policy()
    out = client.many(8, "GET", pair.url, concurrency=8)
    assert out.failed() == [] and set(out.bodies()) == {"fast"}
    assert pair.fast.count == 8
    assert eventually(lambda: pair.in_flight() == {"slow": 0, "fast": 0})
    assert mesh.destination(pair.service).inflight == 0


def test_a_failed_copy_does_not_end_the_call_while_another_is_in_flight(mesh, client):
    svc = f"hedge-{uuid.uuid4().hex[:10]}"
    slow = Upstream("slow", mode="hang")
    busy = Upstream("busy", mode="503")
    try:
        register(mesh, svc, slow, weight=10_000)
        register(mesh, svc, busy, weight=1)
        wait_endpoints(mesh, svc, 2)
        set_policy(mesh, svc, hedging(per_try_timeout="600ms", attempts=2))
        t0 = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            client.request("GET", f"http://{svc}/x")
        elapsed = time.monotonic() - t0
        # the copy's 503 came back after ~DELAY, but the first attempt was still running:
        # the call waited for it (per-try timeout), then had no attempts left
        assert slow.count == 1 and busy.count == 1
        assert elapsed >= 0.55, elapsed
        assert sample("meshlib_client_retries_refused_total", server_address=svc,
                      reason="attempts_exhausted") == 1
        assert mesh.destination(svc).inflight == 0
    finally:
        slow.kill()
        busy.kill()
