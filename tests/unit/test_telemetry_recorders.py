"""The recorders drivers call: cached children, label values, bounds, gauges."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from meshlib.core.health import EventKind, HealthEvent
from meshlib.core.outcome import Outcome
from meshlib.telemetry import semconv as sc
from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.recorders import (
    HttpClientRecorder,
    HttpServerRecorder,
    RpcClientRecorder,
    RpcServerRecorder,
    error_type_of,
    split_full_method,
)


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(reg: CollectorRegistry) -> MeshMetrics:
    return MeshMetrics(reg)


def count(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_for_service_returns_one_recorder_per_service_and_registry(m: MeshMetrics) -> None:
    a = HttpClientRecorder.for_service("orders", metrics=m)
    assert HttpClientRecorder.for_service("orders", metrics=m) is a
    assert HttpClientRecorder.for_service("users", metrics=m) is not a
    other = MeshMetrics(CollectorRegistry())
    assert HttpClientRecorder.for_service("orders", metrics=other) is not a


def test_default_metrics_are_registered_once_per_process() -> None:
    d = MeshMetrics.default()
    assert MeshMetrics.default() is d
    assert d.registry is REGISTRY
    with pytest.raises(ValueError, match="already registered on the default registry"):
        MeshMetrics()
    rec = HttpClientRecorder.for_service("telemetry-test-default")
    assert rec is HttpClientRecorder.for_service("telemetry-test-default", metrics=d)


def test_second_call_reuses_the_cached_child(m: MeshMetrics, reg: CollectorRegistry) -> None:
    rec = HttpClientRecorder.for_service("orders", metrics=m)
    rec.request(b"GET", 200, "", 0.01)
    cache = rec._requests.children
    child = cache[(b"GET", 200, "")]
    rec.request(b"GET", 200, "", 0.02)
    assert cache[(b"GET", 200, "")] is child
    assert len(cache) == 1
    assert count(reg, "http_client_request_duration_seconds_count", http_request_method="GET",
                 http_response_status_code="200", server_address="orders", error_type="") == 2


def test_http_client_labels_and_derived_error_type(m: MeshMetrics, reg: CollectorRegistry) -> None:
    rec = HttpClientRecorder.for_service("orders", metrics=m)
    rec.request("PROPFIND", 503, None, 0.3)
    rec.request(b"POST", None, "timeout", 1.0)
    rec.request("get", 404, "", 0.001)
    name = "http_client_request_duration_seconds_count"
    assert count(reg, name, http_request_method="_OTHER", http_response_status_code="503",
                 server_address="orders", error_type="503") == 1
    assert count(reg, name, http_request_method="POST", http_response_status_code="",
                 server_address="orders", error_type="timeout") == 1
    assert count(reg, name, http_request_method="_OTHER", http_response_status_code="404",
                 server_address="orders", error_type="404") == 1
    # the 0.3 s observation lands in the 0.5 bucket, not in 0.25
    b = "http_client_request_duration_seconds_bucket"
    base = dict(http_request_method="_OTHER", http_response_status_code="503",
                server_address="orders", error_type="503")
    assert count(reg, b, le="0.25", **base) == 0
    assert count(reg, b, le="0.5", **base) == 1


def test_error_type_values_are_capped(m: MeshMetrics, reg: CollectorRegistry) -> None:
    rec = HttpClientRecorder.for_service("orders", metrics=m)
    for i in range(sc.MAX_DISTINCT_VALUES + 5):
        rec.request(b"GET", None, f"Err{i}", 0.01)
    assert count(reg, "http_client_request_duration_seconds_count", http_request_method="GET",
                 http_response_status_code="", server_address="orders",
                 error_type="_OTHER") == 5


def test_attempts_retries_and_refusals(m: MeshMetrics, reg: CollectorRegistry) -> None:
    rec = HttpClientRecorder.for_service("orders", metrics=m)
    rec.attempt(1, Outcome.GATEWAY_ERROR, 0.01)
    rec.retry(Outcome.GATEWAY_ERROR)
    rec.attempt(2, Outcome.GATEWAY_ERROR, 0.01)
    rec.attempt(3, "timeout", 0.5)
    rec.attempt(7, Outcome.TIMEOUT, 0.5)
    rec.retry_refused("attempts_exhausted")
    rec.budget_exhausted()
    h = "meshlib_client_attempt_duration_seconds_count"
    assert count(reg, h, server_address="orders", attempt="1", outcome="gateway_error") == 1
    assert count(reg, h, server_address="orders", attempt="2", outcome="gateway_error") == 1
    assert count(reg, h, server_address="orders", attempt="3+", outcome="timeout") == 2
    assert count(reg, "meshlib_client_retries_total", server_address="orders",
                 reason="gateway_error") == 1
    refused = "meshlib_client_retries_refused_total"
    assert count(reg, refused, server_address="orders", reason="attempts_exhausted") == 1
    assert count(reg, refused, server_address="orders", reason="budget_exhausted") == 1
    assert count(reg, "meshlib_client_retry_budget_exhausted_total",
                 server_address="orders") == 1


def test_breaker_gauge_counts_endpoints_per_state(m: MeshMetrics, reg: CollectorRegistry) -> None:
    http = HttpClientRecorder.for_service("orders", metrics=m)
    rpc = RpcClientRecorder.for_service("orders", metrics=m)  # shares the service's gauges
    g = "meshlib_client_breaker_endpoints"
    http.breaker_transition("10.0.0.1:80", "open")
    rpc.health_event(HealthEvent(EventKind.BREAKER_OPENED, "10.0.0.2:80", 1.0))
    assert count(reg, g, server_address="orders", state="open") == 2
    http.health_event(HealthEvent(EventKind.BREAKER_HALF_OPEN, "10.0.0.1:80", 2.0))
    http.breaker_transition("10.0.0.1:80", "half-open")  # repeated: no change
    assert count(reg, g, server_address="orders", state="open") == 1
    assert count(reg, g, server_address="orders", state="half-open") == 1
    http.forget_endpoint("10.0.0.1:80")
    assert count(reg, g, server_address="orders", state="half-open") == 0
    t = "meshlib_client_breaker_transitions_total"
    assert count(reg, t, server_address="orders", state="open") == 2
    assert count(reg, t, server_address="orders", state="half-open") == 1
    with pytest.raises(ValueError, match="'broken' for endpoint '10.0.0.3:80' of 'orders'"):
        http.breaker_transition("10.0.0.3:80", "broken")


def test_ejections_and_ejected_gauge(m: MeshMetrics, reg: CollectorRegistry) -> None:
    rec = HttpClientRecorder.for_service("orders", metrics=m)
    rec.health_event(HealthEvent(EventKind.EJECTED, "a:1", 1.0, "consecutive_5xx", 30.0, 1))
    rec.ejected("b:1", "consecutive_gateway_failure")
    rec.health_event(HealthEvent(EventKind.EJECTION_SKIPPED, "c:1", 1.0, "consecutive_5xx"))
    assert count(reg, "meshlib_client_ejected_endpoints", server_address="orders") == 2
    rec.health_event(HealthEvent(EventKind.UNEJECTED, "a:1", 31.0))
    rec.unejected("a:1")  # twice: no double decrement
    rec.forget_endpoint("b:1")
    assert count(reg, "meshlib_client_ejected_endpoints", server_address="orders") == 0
    assert count(reg, "meshlib_client_ejections_total", server_address="orders",
                 reason="consecutive_5xx") == 1
    assert count(reg, "meshlib_client_ejections_skipped_total", server_address="orders") == 1
    rec.no_endpoints()
    rec.concurrency_rejected()
    assert count(reg, "meshlib_client_no_endpoints_total", server_address="orders") == 1
    assert count(reg, "meshlib_client_concurrency_rejections_total",
                 server_address="orders") == 1


def test_rpc_client_method_recorder(m: MeshMetrics, reg: CollectorRegistry) -> None:
    rec = RpcClientRecorder.for_service("orders", metrics=m)
    meth = rec.method("shop.Orders", "Get")
    assert rec.method("shop.Orders", "Get") is meth
    meth.call("OK", "", 0.004)
    meth.call(14, None, 0.004)
    rec.call("shop.Orders", "Get", None, "grpc.RpcError", 0.1)
    n = "rpc_client_call_duration_seconds_count"
    base = dict(rpc_system="grpc", rpc_service="shop.Orders", rpc_method="Get",
                server_address="orders")
    assert count(reg, n, rpc_response_status_code="OK", error_type="", **base) == 1
    assert count(reg, n, rpc_response_status_code="UNAVAILABLE", error_type="UNAVAILABLE",
                 **base) == 1
    assert count(reg, n, rpc_response_status_code="", error_type="grpc.RpcError", **base) == 1


def test_http_server_routes_never_raw_paths(m: MeshMetrics, reg: CollectorRegistry) -> None:
    rec = HttpServerRecorder.get(metrics=m)
    assert HttpServerRecorder.get(metrics=m) is rec
    rec.request(b"GET", 200, "/orders/{id}", "", 0.01, caller="web")
    rec.request(b"GET", 404, None, "", 0.01)
    rec.request("POST", 500, "/orders", None, 0.01, caller="web")
    n = "http_server_request_duration_seconds_count"
    assert count(reg, n, http_request_method="GET", http_response_status_code="200",
                 http_route="/orders/{id}", error_type="", meshlib_caller="web") == 1
    # 404 is not a server error; no route template -> constant empty route
    assert count(reg, n, http_request_method="GET", http_response_status_code="404",
                 http_route="", error_type="", meshlib_caller="") == 1
    assert count(reg, n, http_request_method="POST", http_response_status_code="500",
                 http_route="/orders", error_type="500", meshlib_caller="web") == 1


def test_server_callers_are_capped_and_denials_counted(m: MeshMetrics,
                                                       reg: CollectorRegistry) -> None:
    rec = RpcServerRecorder.get(metrics=m)
    for i in range(sc.MAX_DISTINCT_VALUES + 3):
        rec.access_denied(f"svc{i}")
    assert count(reg, "meshlib_server_access_denials_total", meshlib_caller="_OTHER") == 3
    assert count(reg, "meshlib_server_access_denials_total", meshlib_caller="svc0") == 1


def test_rpc_server_error_codes(m: MeshMetrics, reg: CollectorRegistry) -> None:
    rec = RpcServerRecorder.get(metrics=m)
    svc, meth = split_full_method("/shop.Orders/Get")
    rec.call(svc, meth, "NOT_FOUND", "", 0.01, caller="web")
    rec.call(svc, meth, "INTERNAL", "", 0.01, caller="web")
    n = "rpc_server_call_duration_seconds_count"
    base = dict(rpc_system="grpc", rpc_service="shop.Orders", rpc_method="Get",
                meshlib_caller="web")
    assert count(reg, n, rpc_response_status_code="NOT_FOUND", error_type="", **base) == 1
    assert count(reg, n, rpc_response_status_code="INTERNAL", error_type="INTERNAL",
                 **base) == 1


def test_split_full_method_and_error_type_of() -> None:
    assert split_full_method("/a.B/C") == ("a.B", "C")
    assert split_full_method("nonsense") == ("_OTHER", "_OTHER")
    assert error_type_of(TimeoutError()) == "TimeoutError"
    assert error_type_of(ValueError()) == "ValueError"

    class Boom(Exception):
        pass

    assert error_type_of(Boom()).endswith("Boom")
    assert error_type_of(Boom()).startswith(__name__)


def test_recorder_serves_as_the_core_call_observer(m: MeshMetrics, reg: CollectorRegistry) -> None:
    from meshlib.core.call import CallObserver

    rec = HttpClientRecorder.for_service("orders", metrics=m)
    for hook in ("retry", "stopped", "health"):
        assert callable(getattr(rec, hook)) and hasattr(CallObserver, hook)
    rec.stopped("deadline_exceeded")
    rec.health((HealthEvent(EventKind.BREAKER_OPENED, "a:1", 1.0),
                HealthEvent(EventKind.EJECTED, "a:1", 1.0, "consecutive_5xx")))
    assert count(reg, "meshlib_client_retries_refused_total", server_address="orders",
                 reason="deadline_exceeded") == 1
    assert count(reg, "meshlib_client_breaker_endpoints", server_address="orders",
                 state="open") == 1
    assert count(reg, "meshlib_client_ejected_endpoints", server_address="orders") == 1


def test_sync_endpoints_counts_new_endpoints_as_closed_and_forgets_departed():
    from prometheus_client import CollectorRegistry

    from meshlib.telemetry.metrics import MeshMetrics
    from meshlib.telemetry.recorders import HttpClientRecorder

    reg = CollectorRegistry()
    rec = HttpClientRecorder.for_service("gauges", metrics=MeshMetrics(reg))

    def gauge(state):
        return reg.get_sample_value("meshlib_client_breaker_endpoints",
                                    {"server_address": "gauges", "state": state})

    rec.sync_endpoints(["a", "b", "c"])
    assert gauge("closed") == 3 and gauge("open") == 0
    rec.breaker_transition("a", "open")
    assert gauge("closed") == 2 and gauge("open") == 1
    rec.sync_endpoints(["b", "c", "d"])  # a left, d arrived
    assert gauge("closed") == 3 and gauge("open") == 0


def test_series_shortcuts_observe_the_series_of_the_general_methods(
        m: MeshMetrics, reg: CollectorRegistry) -> None:
    """The gRPC driver observes ``attempt_series(1, SUCCESS)`` and ``series("OK", None)``
    directly on its common path; they must be the series ``attempt(1, SUCCESS, s)`` and
    ``call("OK", None, s)`` observe."""
    rec = RpcClientRecorder.for_service("orders", metrics=m)
    rec.attempt(1, Outcome.SUCCESS, 0.01)
    rec.attempt_series(1, Outcome.SUCCESS).observe(0.02)
    assert count(reg, "meshlib_client_attempt_duration_seconds_count", server_address="orders",
                 attempt="1", outcome="success") == 2
    assert rec.attempt_series(1, Outcome.SUCCESS) is rec._attempt_ids[(id(Outcome.SUCCESS), 1)]
    meth = rec.method("shop.Orders", "Get")
    meth.call("OK", None, 0.01)
    meth.series("OK", None).observe(0.02)
    assert count(reg, "rpc_client_call_duration_seconds_count", rpc_system="grpc",
                 rpc_service="shop.Orders", rpc_method="Get", server_address="orders",
                 rpc_response_status_code="OK", error_type="") == 2
