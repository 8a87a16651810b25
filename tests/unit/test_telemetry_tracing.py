"""Client/server spans and W3C propagation through meshlib.telemetry.tracing, checked with the
OpenTelemetry SDK's in-memory exporter (the SDK is a test dependency only)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshlib.telemetry import tracing


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.configure(tracer_provider=provider, propagate_without_sdk=False)
    yield exp
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)


@pytest.fixture
def no_sdk() -> Iterator[None]:
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)
    yield
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)


def traceparent_of(span: trace.Span) -> str:
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def header(headers: list[tuple[bytes, bytes]] | list[tuple[str, str]], name: str) -> list[object]:
    return [v for k, v in headers if (k.decode() if isinstance(k, bytes) else k) == name]


def test_http_call_has_attempt_children_with_semconv_attributes(
        exporter: InMemorySpanExporter) -> None:
    call = tracing.start_http_call("orders", b"GET")
    a1 = call.attempt(1, "10.0.0.1", 8080)
    a1.end(503)
    a2 = call.attempt(2, "10.0.0.2", 8080)
    a2.end(200)
    call.end(200)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert len(exporter.get_finished_spans()) == 3
    parent = spans["GET orders"]
    first, second = (s for s in exporter.get_finished_spans() if s.name == "GET")
    assert parent.kind is SpanKind.INTERNAL
    for att in (first, second):
        assert att.kind is SpanKind.CLIENT
        assert att.parent is not None and att.parent.span_id == parent.context.span_id
        assert att.context.trace_id == parent.context.trace_id
        assert att.attributes["http.request.method"] == "GET"
        assert att.attributes["server.address"] == "orders"
        assert att.attributes["server.port"] == 8080
    assert first.attributes["network.peer.address"] == "10.0.0.1"
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "503"
    assert first.status.status_code is StatusCode.ERROR
    assert second.status.status_code is StatusCode.UNSET
    assert "error.type" not in parent.attributes
    assert "url.full" not in parent.attributes


def test_unknown_method_is_other_with_original(exporter: InMemorySpanExporter) -> None:
    call = tracing.start_http_call("orders", "PROPFIND")
    call.end(None, "timeout")
    (span,) = exporter.get_finished_spans()
    assert span.name == "HTTP orders"
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "PROPFIND"
    assert span.attributes["error.type"] == "timeout"


def test_traceparent_injected_into_httpcore_header_list_matches_attempt(
        exporter: InMemorySpanExporter) -> None:
    call = tracing.start_http_call("orders", b"GET")
    att = call.attempt(1, "10.0.0.1", 80)
    headers = [(b"host", b"orders"), (b"traceparent", b"00-stale-stale-00")]
    att.inject(headers, binary=True)
    assert header(headers, "traceparent") == [traceparent_of(att.span).encode()]
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in headers)
    att.end(200)
    call.end(200)


def test_baggage_is_propagated(exporter: InMemorySpanExporter) -> None:
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        headers: list[tuple[bytes, bytes]] = [(b"host", b"orders")]
        call = tracing.start_http_call("orders", b"GET")
        call.attempt(1).inject(headers)
    finally:
        otel_context.detach(token)
    assert header(headers, "baggage") == [b"tenant=acme"]


def test_rpc_call_injects_into_grpc_metadata_and_server_continues_the_trace(
        exporter: InMemorySpanExporter) -> None:
    call = tracing.start_rpc_call("orders", "shop.Orders", "Get")
    att = call.attempt(1, "10.0.0.1", 50051)
    metadata: list[tuple[str, str]] = []
    att.inject(metadata, binary=False)
    assert header(metadata, "traceparent") == [traceparent_of(att.span)]

    server = tracing.start_server_span(metadata, rpc_service="shop.Orders", rpc_method="Get",
                                       caller="web")
    server.attach()
    assert trace.get_current_span() is server.span
    server.end("INTERNAL")
    assert trace.get_current_span() is not server.span
    att.end("UNAVAILABLE")
    call.end("UNAVAILABLE")

    spans = {(s.name, s.kind): s for s in exporter.get_finished_spans()}
    srv = spans[("shop.Orders/Get", SpanKind.SERVER)]
    cli = spans[("shop.Orders/Get", SpanKind.CLIENT)]
    assert srv.parent is not None and srv.parent.span_id == cli.context.span_id
    assert srv.attributes["rpc.system"] == "grpc"
    assert srv.attributes["meshlib.caller"] == "web"
    assert srv.attributes["error.type"] == "INTERNAL"
    assert cli.attributes["rpc.response.status_code"] == "UNAVAILABLE"
    assert cli.attributes["rpc.service"] == "shop.Orders"
    assert cli.attributes["rpc.method"] == "Get"


def test_http_server_span_from_asgi_headers_and_wsgi_environ(
        exporter: InMemorySpanExporter) -> None:
    parent_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    asgi = tracing.start_server_span([(b"traceparent", parent_tp.encode())], method=b"GET",
                                     route="/orders/{id}")
    asgi.end(404)
    wsgi = tracing.start_server_span({"HTTP_TRACEPARENT": parent_tp}, method="POST")
    wsgi.end(500)
    a, w = exporter.get_finished_spans()
    for s in (a, w):
        assert s.kind is SpanKind.SERVER
        assert s.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
        assert s.parent is not None and s.parent.span_id == 0xB7AD6B7169203331
    assert a.name == "GET /orders/{id}"
    assert a.attributes["http.route"] == "/orders/{id}"
    assert "error.type" not in a.attributes  # 404 is not a server error
    assert w.attributes["error.type"] == "500"


def test_no_sdk_gives_noop_objects_and_injects_nothing(no_sdk: None) -> None:
    assert not tracing.enabled()
    call = tracing.start_http_call("orders", b"GET")
    assert call is tracing.start_rpc_call("orders", "a.B", "C")  # one shared no-op
    headers = [(b"host", b"orders")]
    call.attempt(1, "10.0.0.1", 80).inject(headers)
    assert headers == [(b"host", b"orders")]
    call.end(200)
    srv = tracing.start_server_span([(b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16
                                      + b"-01")], method="GET")
    srv.attach()
    assert not trace.get_current_span().get_span_context().is_valid
    srv.end(200)


def test_passthrough_without_sdk_forwards_the_inbound_context(no_sdk: None) -> None:
    tracing.configure(propagate_without_sdk=True)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    srv = tracing.start_server_span([(b"traceparent", tp.encode())], method="GET")
    srv.attach()
    try:
        out: list[tuple[bytes, bytes]] = [(b"host", b"users")]
        tracing.start_http_call("users", b"GET").attempt(1).inject(out)
    finally:
        srv.end(200)
    assert header(out, "traceparent") == [tp.encode()]


def test_off_until_is_what_start_rpc_call_answers(no_sdk: None) -> None:
    """``state.off_until``, the one "tracing off" flag (the gRPC driver compares its own clock
    reading with it), agrees with the span factories: off -> the shared no-op call span."""
    import time

    assert tracing.start_rpc_call("orders", "a.B", "C") is tracing.NOOP_CALL  # looked, no SDK
    assert time.perf_counter() < tracing.state.off_until  # off until the next look
    assert tracing.state.off_until - time.perf_counter() <= tracing.RECHECK_SECONDS
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.configure(tracer_provider=provider)
    assert not time.perf_counter() < tracing.state.off_until  # configure() forces a new look
    call = tracing.start_rpc_call("orders", "a.B", "C")
    assert call is not tracing.NOOP_CALL
    assert tracing.state.off_until == float("-inf")  # a tracer is kept once seen
    call.end("OK")
    assert len(exp.get_finished_spans()) == 1
