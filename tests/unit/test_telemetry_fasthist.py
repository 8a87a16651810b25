"""FastHistogram: exports what prometheus_client's Histogram exports, byte for byte, and
counts exactly under concurrency."""

from __future__ import annotations

import re
import threading

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from meshlib.core.outcome import Outcome
from meshlib.telemetry import semconv as sc
from meshlib.telemetry.fasthist import PENDING_MAX, FastHistogram, HistogramChild
from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.recorders import (
    HttpClientRecorder,
    HttpServerRecorder,
    RpcClientRecorder,
    RpcServerRecorder,
)

LABELS = ("method", "code")
#: Below, on and between bounds, above the last finite bound, zero and negative.
VALUES = (0.0006, 0.005, 0.0051, 0.3, 0.75, 1.0, 9.99, 10.0, 10.5, 1e6, 0.0, -1.0)
_CREATED = re.compile(rb"(?m)^(\S*_created.*) [0-9.e+]+$")


def _pair() -> tuple[CollectorRegistry, CollectorRegistry, Histogram, FastHistogram]:
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("x_duration_seconds", "Help text.", LABELS, registry=ref_reg,
                    buckets=sc.DURATION_BUCKETS)
    fast = FastHistogram("x_duration_seconds", "Help text.", LABELS, sc.DURATION_BUCKETS,
                         registry=fast_reg)
    for i, v in enumerate(VALUES):
        labels = ("GET", "200") if i % 3 else ("POST", "")
        ref.labels(*labels).observe(v)
        fast.labels(*labels).observe(v)
    return ref_reg, fast_reg, ref, fast


def _strip_created(text: bytes) -> bytes:
    """``_created`` values are creation timestamps: equal in form, not in value."""
    return _CREATED.sub(rb"\1 T", text)


def test_text_exposition_is_identical_to_prometheus_client_histogram() -> None:
    ref_reg, fast_reg, _, _ = _pair()
    ref, fast = generate_latest(ref_reg), generate_latest(fast_reg)
    assert b"_created" in ref  # the comparison covers the _created series too
    assert _strip_created(fast) == _strip_created(ref)
    assert (b'x_duration_seconds_bucket{code="200",le="+Inf",method="GET"} 8.0' in fast)
    assert b'le="0.005"' in fast and b'le="10.0"' in fast


def test_openmetrics_exposition_is_identical_to_prometheus_client_histogram() -> None:
    ref_reg, fast_reg, _, _ = _pair()
    assert _strip_created(generate_openmetrics(fast_reg)) == _strip_created(
        generate_openmetrics(ref_reg))


def test_created_series_follow_prometheus_client_switch() -> None:
    prometheus_client.disable_created_metrics()
    try:
        ref_reg, fast_reg, _, _ = _pair()
        fast = generate_latest(fast_reg)
        assert b"_created" not in fast
        assert fast == generate_latest(ref_reg)
    finally:
        prometheus_client.enable_created_metrics()


def test_le_is_inclusive_and_count_is_the_sum_of_buckets() -> None:
    reg = CollectorRegistry()
    h = FastHistogram("d_seconds", "d", ("a",), (0.1, 1.0), registry=reg)
    for v in (0.1, 0.10000001, 1.0, 5.0):
        h.labels("x").observe(v)
    got = {s.labels.get("le", s.name): s.value for m in reg.collect() for s in m.samples
           if s.name != "d_seconds_created"}
    assert got == {"0.1": 1.0, "1.0": 3.0, "+Inf": 4.0, "d_seconds_count": 4.0,
                   "d_seconds_sum": pytest.approx(6.20000001)}


def test_labels_by_name_position_and_errors() -> None:
    h = FastHistogram("e_seconds", "e", LABELS, (1.0,), registry=None)
    child = h.labels("GET", 200)
    assert isinstance(child, HistogramChild)
    assert h.labels(code="200", method="GET") is child  # values are str()-ed, as upstream
    with pytest.raises(ValueError, match="'e_seconds': 1 label values for labels"):
        h.labels("GET")
    with pytest.raises(ValueError, match="label names"):
        h.labels(method="GET", status="200")
    with pytest.raises(ValueError, match="invalid label name 'le'"):
        FastHistogram("f_seconds", "f", ("le",), (1.0,), registry=None)
    with pytest.raises(ValueError, match="buckets not in sorted order"):
        FastHistogram("g_seconds", "g", (), (2.0, 1.0), registry=None)
    h.remove("GET", "200")
    assert h.labels("GET", "200") is not child


def test_same_name_twice_on_a_registry_is_refused() -> None:
    reg = CollectorRegistry(auto_describe=True)
    FastHistogram("dup_seconds", "d", (), (1.0,), registry=reg)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Histogram("dup_seconds", "d", registry=reg)


def test_concurrent_observations_are_all_counted() -> None:
    reg = CollectorRegistry()
    h = FastHistogram("c_seconds", "c", ("a",), sc.DURATION_BUCKETS, registry=reg)
    threads, per_thread = 8, 20_000
    barrier = threading.Barrier(threads)

    def work(k: int) -> None:
        child = h.labels("x")
        barrier.wait()
        for i in range(per_thread):
            child.observe(0.001 if (i + k) % 2 else 0.5)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    total = threads * per_thread
    assert reg.get_sample_value("c_seconds_count", {"a": "x"}) == total
    assert reg.get_sample_value("c_seconds_bucket", {"a": "x", "le": "0.005"}) == total / 2
    assert reg.get_sample_value("c_seconds_sum", {"a": "x"}) == pytest.approx(
        total / 2 * 0.001 + total / 2 * 0.5)


def test_duration_families_use_fast_histograms_and_export_via_the_registry() -> None:
    reg = CollectorRegistry()
    m = MeshMetrics(reg)
    for spec in sc.ALL_FAMILIES:
        assert isinstance(m.family(spec), FastHistogram) == (spec.kind == "histogram")
    http = HttpClientRecorder.for_service("orders", metrics=m)
    rpc = RpcClientRecorder.for_service("orders", metrics=m)
    http.request(b"GET", 200, None, 0.01)
    rpc.method("a.B", "C").call("OK", None, 0.01)
    HttpServerRecorder.get(metrics=m).request("GET", 200, "/x", None, 0.01)
    RpcServerRecorder.get(metrics=m).call("a.B", "C", "OK", None, 0.01)
    for spec in (sc.HTTP_CLIENT_DURATION, sc.RPC_CLIENT_DURATION, sc.HTTP_SERVER_DURATION,
                 sc.RPC_SERVER_DURATION):
        counts = [s.value for f in reg.collect() for s in f.samples
                  if s.name == spec.name + "_count"]
        assert counts == [1.0], spec.name


def test_attempt_enum_and_string_outcomes_share_one_series() -> None:
    reg = CollectorRegistry()
    m = MeshMetrics(reg)
    http = HttpClientRecorder.for_service("orders", metrics=m)
    rpc = RpcClientRecorder.for_service("orders", metrics=m)
    for _ in range(3):
        http.attempt(1, Outcome.TIMEOUT, 0.2)   # identity-keyed fast path after the first
    rpc.attempt(1, "timeout", 0.2)              # value-keyed path, same child
    http.attempt(5, Outcome.TIMEOUT, 0.2)
    http.attempt(3, Outcome.TIMEOUT, 0.2)
    name = "meshlib_client_attempt_duration_seconds_count"
    assert reg.get_sample_value(name, {"server_address": "orders", "attempt": "1",
                                       "outcome": "timeout"}) == 4
    assert reg.get_sample_value(name, {"server_address": "orders", "attempt": "3+",
                                       "outcome": "timeout"}) == 2


#: Exactly representable observations (multiples of 1/1024), each in a known bucket of
#: (0.005, 0.01, 0.1, 1.0): sums of them are exact in any order.
EXACT = ((1 / 1024, "0.005"), (10 / 1024, "0.01"), (100 / 1024, "0.1"), (1.0, "1.0"),
         (2048 / 1024, "+Inf"))
EXACT_BOUNDS = (0.005, 0.01, 0.1, 1.0)


def _observe_concurrently(h: FastHistogram, threads: int, per_thread: int,
                          done: threading.Event | None = None,
                          midway: threading.Event | None = None) -> None:
    """``threads`` threads each observe ``per_thread`` values cycling through EXACT; each
    waits for ``midway`` (when given) halfway through; ``done`` is set when all are done."""
    barrier = threading.Barrier(threads)

    def work(k: int) -> None:
        child = h.labels("x")
        barrier.wait()
        for i in range(per_thread):
            if i == per_thread // 2 and midway is not None:
                assert midway.wait(30), "the scraper never saw a partial count"
            child.observe(EXACT[(i + k) % len(EXACT)][0])

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if done is not None:
        done.set()


def _expected(threads: int, per_thread: int) -> tuple[dict[str, float], float]:
    """Cumulative bucket counts by ``le`` and the exact sum for _observe_concurrently."""
    per_bucket = dict.fromkeys((le for _, le in EXACT), 0)
    total = 0.0
    for k in range(threads):
        for i in range(per_thread):
            v, le = EXACT[(i + k) % len(EXACT)]
            per_bucket[le] += 1
            total += v
    cumulative, acc = {}, 0
    for _, le in EXACT:
        acc += per_bucket[le]
        cumulative[le] = float(acc)
    return cumulative, total


def _assert_exact(reg: CollectorRegistry, threads: int, per_thread: int) -> None:
    cumulative, total = _expected(threads, per_thread)
    for le, n in cumulative.items():
        assert reg.get_sample_value("p_seconds_bucket", {"a": "x", "le": le}) == n, le
    assert reg.get_sample_value("p_seconds_count", {"a": "x"}) == threads * per_thread
    assert reg.get_sample_value("p_seconds_sum", {"a": "x"}) == total  # exact, not approx


def test_deferred_observations_are_exact_under_concurrent_observers() -> None:
    reg = CollectorRegistry()
    h = FastHistogram("p_seconds", "p", ("a",), EXACT_BOUNDS, registry=reg)
    threads, per_thread = 8, 10_001  # not a multiple of the bound: some stay pending
    _observe_concurrently(h, threads, per_thread)
    assert len(h.labels("x")._pending) > 0  # the scrape below has pending items to fold
    _assert_exact(reg, threads, per_thread)
    assert len(h.labels("x")._pending) == 0


def test_deferred_observations_are_exact_with_a_concurrent_scraper() -> None:
    reg = CollectorRegistry()
    h = FastHistogram("p_seconds", "p", ("a",), EXACT_BOUNDS, registry=reg)
    threads, per_thread = 6, 10_001
    done, midway = threading.Event(), threading.Event()
    scrapes: list[dict[str, float]] = []
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            while not done.is_set():
                seen = {s.labels.get("le", s.name): s.value for m in h.collect()
                        for s in m.samples if s.name in ("p_seconds_bucket", "p_seconds_count")}
                if seen:
                    scrapes.append(seen)
                    if seen["p_seconds_count"] > 0:
                        midway.set()  # observers wait for this halfway: a scrape in between
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    _observe_concurrently(h, threads, per_thread, done=done, midway=midway)
    scraper.join()
    assert not errors
    total = threads * per_thread
    assert any(0 < seen["p_seconds_count"] < total for seen in scrapes)  # ran in between
    keys = [le for _, le in EXACT] + ["p_seconds_count"]
    for earlier, later in zip(scrapes, scrapes[1:], strict=False):
        for key in keys:
            assert later[key] >= earlier[key], (key, earlier, later)
    for seen in scrapes:  # each scrape is itself consistent: cumulative and count == +Inf
        values = [seen[le] for _, le in EXACT]
        assert values == sorted(values)
        assert seen["p_seconds_count"] == seen["+Inf"]
    _assert_exact(reg, threads, per_thread)


def test_pending_queue_stays_within_the_bound_without_scrapes() -> None:
    reg = CollectorRegistry()
    h = FastHistogram("p_seconds", "p", ("a",), EXACT_BOUNDS, registry=reg)
    child = h.labels("x")
    per_thread = PENDING_MAX * 7 + 3
    longest = 0
    for i in range(per_thread):
        child.observe(EXACT[i % len(EXACT)][0])
        longest = max(longest, len(child._pending))
        assert len(child._pending) <= PENDING_MAX
    assert longest == PENDING_MAX  # it does defer, up to the bound
    assert len(child._pending) == per_thread % (PENDING_MAX + 1)
    _assert_exact(reg, 1, per_thread)


def test_snapshot_includes_every_earlier_observation() -> None:
    h = FastHistogram("s_seconds", "s", (), (0.1, 1.0), registry=None)
    child = h.labels()
    child.observe(0.5)
    child.observe(0.05)
    assert child.snapshot() == ([1, 1, 0], 0.55)
    child.observe(3.0)
    assert child.snapshot() == ([1, 1, 1], 3.55)
