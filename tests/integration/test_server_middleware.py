"""The inbound side: ASGI / WSGI middleware and gRPC server interceptors (meshlib.server).

Real servers on loopback (uvicorn for ASGI, werkzeug for WSGI, grpcio sync and aio), real etcd
through the ``mesh`` fixture for access policies, a private Prometheus registry per test, and
the OpenTelemetry SDK with an in-memory exporter for traces. The 10,000-path cardinality test
drives the ASGI middleware in process (httpx.ASGITransport) for speed; the same route-template
labelling is also checked over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from flask import Flask, jsonify
from grpc_servers import pb, pb_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from werkzeug.serving import make_server

from meshlib.context import current_deadline
from meshlib.mesh import Mesh
from meshlib.server import (
    AioMeshServerInterceptor,
    MeshASGIMiddleware,
    MeshServerInterceptor,
    MeshWSGIMiddleware,
)
from meshlib.telemetry import tracing
from meshlib.telemetry.metrics import MeshMetrics

SERVICE = "orders"
HTTP_FAMILY = "http_server_request_duration_seconds"
RPC_FAMILY = "rpc_server_call_duration_seconds"
DENIALS = "meshlib_server_access_denials_total"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TEST_SERVICE = "meshtest.TestService"


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture
def metrics() -> MeshMetrics:
    return MeshMetrics(CollectorRegistry())


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.configure(tracer_provider=provider, propagate_without_sdk=False)
    exp.provider = provider  # type: ignore[attr-defined]
    yield exp
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)


def series(metrics: MeshMetrics, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """``{sorted label items: count}`` of every child of a histogram family."""
    out = {}
    for fam in metrics.registry.collect():
        for s in fam.samples:
            if s.name == family + "_count":
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def count(metrics: MeshMetrics, family: str, **labels: str) -> float:
    """Sum of the counts of the children whose labels include ``labels``."""
    return sum(v for k, v in series(metrics, family).items()
               if all(dict(k).get(n) == val for n, val in labels.items()))


def denials(metrics: MeshMetrics, caller: str) -> float:
    v = metrics.registry.get_sample_value(DENIALS, {"meshlib_caller": caller})
    return v or 0.0


def set_policy(mesh: Mesh, allow: list[str]) -> None:
    """Write ``access.allow`` of ``orders`` into etcd and wait until the mesh has it."""
    mesh.client.put(mesh.layout.policy_key(SERVICE),
                    f"access: {{allow: {json.dumps(allow)}}}".encode())
    until = time.monotonic() + 10
    while tuple(mesh.snapshot(SERVICE).policy.access.allow) != tuple(allow):
        assert time.monotonic() < until, f"policy allow={allow} never reached the snapshot"
        time.sleep(0.01)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    until = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < until, "condition not reached"
        time.sleep(0.01)


class UvicornThread:
    """uvicorn serving ``app`` on a free loopback port in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_level="warning", loop="asyncio",
                                http="h11")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        wait_until(lambda: self.server.started)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class WerkzeugThread:
    def __init__(self, app: Any) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WerkzeugThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"


# --------------------------------------------------------------------------- ASGI


def starlette_app(log: dict[str, Any]) -> Starlette:
    """/orders/{id} echoes the deadline it saw; /slow sleeps; /fail raises."""

    async def order(request: Request) -> JSONResponse:
        log["calls"] = log.get("calls", 0) + 1
        d = current_deadline.get()
        provider = log.get("provider")
        if provider is not None:  # a span of the handler's own: must be the server span's child
            with provider.get_tracer("test").start_as_current_span("inner"):
                pass
        return JSONResponse({
            "id": request.path_params["id"],
            "remaining": None if d is None else d.at - time.monotonic(),
        })

    async def slow(request: Request) -> PlainTextResponse:
        log["calls"] = log.get("calls", 0) + 1
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            log["cancelled"] = True
            raise
        return PlainTextResponse("late")

    async def fail(request: Request) -> PlainTextResponse:
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/orders/{id}", order), Route("/slow", slow),
                             Route("/fail", fail)])


async def test_asgi_10000_distinct_paths_make_one_route_series(metrics: MeshMetrics) -> None:
    app = MeshASGIMiddleware(starlette_app({}), None, service=SERVICE, metrics=metrics)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
        for i in range(10_000):
            r = await client.get(f"/orders/{i}")
            assert r.status_code == 200
        for i in range(50):  # unmatched paths: no route label, never the raw path
            assert (await client.get(f"/nope/{i}")).status_code == 404
    got = series(metrics, HTTP_FAMILY)
    assert len(got) == 2, got
    routes = {dict(k)["http_route"]: v for k, v in got.items()}
    assert routes == {"/orders/{id}": 10_000, "": 50}


async def test_asgi_app_exception_is_recorded_as_500(metrics: MeshMetrics) -> None:
    app = MeshASGIMiddleware(starlette_app({}), None, service=SERVICE, metrics=metrics)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
        assert (await client.get("/fail")).status_code == 500
    wait_until(lambda: count(metrics, HTTP_FAMILY, http_route="/fail",
                             http_response_status_code="500", error_type="RuntimeError") == 1)


def test_asgi_real_socket_route_trace_and_deadline(
        metrics: MeshMetrics, exporter: InMemorySpanExporter) -> None:
    log: dict[str, Any] = {"provider": exporter.provider}  # type: ignore[attr-defined]
    app = MeshASGIMiddleware(starlette_app(log), None, service=SERVICE, metrics=metrics)
    with UvicornThread(app) as srv:
        for i in range(20):
            r = httpx.get(f"{srv.url}/orders/{i}", headers={"traceparent": TRACEPARENT,
                                                            "x-mesh-timeout": "2S"})
            assert r.status_code == 200
            assert 1.0 < r.json()["remaining"] <= 2.0  # the handler saw the caller's deadline
    # The server records a call once the response is sent: the client may read it first.
    wait_until(lambda: count(metrics, HTTP_FAMILY) == 20
               and len([s for s in exporter.get_finished_spans()
                        if s.kind == SpanKind.SERVER]) == 20)
    assert series(metrics, HTTP_FAMILY) == {
        (("error_type", ""), ("http_request_method", "GET"), ("http_response_status_code", "200"),
         ("http_route", "/orders/{id}"), ("meshlib_caller", "")): 20.0
    }
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 20
    srv_span = servers[0]
    assert srv_span.name == "GET /orders/{id}"
    assert srv_span.attributes["http.route"] == "/orders/{id}"
    assert format(srv_span.context.trace_id, "032x") == TRACE_ID
    assert format(srv_span.parent.span_id, "016x") == PARENT_ID
    inner = [s for s in spans if s.name == "inner"]
    assert len(inner) == 20
    assert all(s.parent.span_id in {x.context.span_id for x in servers} for s in inner)


def test_asgi_expired_deadline_answers_504_without_calling_the_app(
        metrics: MeshMetrics) -> None:
    log: dict[str, Any] = {}
    app = MeshASGIMiddleware(starlette_app(log), None, service=SERVICE, metrics=metrics)
    with UvicornThread(app) as srv:
        r = httpx.get(f"{srv.url}/orders/1", headers={"x-mesh-timeout": "0m"})
    assert r.status_code == 504
    assert r.json() == {"error": "deadline_exceeded"}
    assert log.get("calls", 0) == 0
    wait_until(lambda: count(metrics, HTTP_FAMILY, http_response_status_code="504",
                             error_type="timeout") == 1)


def test_asgi_handler_is_cancelled_at_the_deadline(metrics: MeshMetrics) -> None:
    log: dict[str, Any] = {}
    app = MeshASGIMiddleware(starlette_app(log), None, service=SERVICE, metrics=metrics)
    with UvicornThread(app) as srv:
        t0 = time.monotonic()
        r = httpx.get(f"{srv.url}/slow", headers={"x-mesh-timeout": "200m"}, timeout=10)
        elapsed = time.monotonic() - t0
    assert r.status_code == 504
    assert elapsed < 4.0  # the handler would have slept 5 s
    assert log == {"calls": 1, "cancelled": True}
    wait_until(lambda: count(metrics, HTTP_FAMILY, http_route="/slow",
                             http_response_status_code="504", error_type="timeout") == 1)


def test_asgi_access_policy_denies_allows_and_follows_etcd_live(
        mesh: Mesh, metrics: MeshMetrics) -> None:
    log: dict[str, Any] = {}
    app = MeshASGIMiddleware(starlette_app(log), mesh, service=SERVICE, metrics=metrics)
    set_policy(mesh, ["billing"])
    with UvicornThread(app) as srv:
        r = httpx.get(f"{srv.url}/orders/1", headers={"x-mesh-caller": "intruder"})
        assert r.status_code == 403
        assert r.json()["caller"] == "intruder" and r.json()["service"] == SERVICE
        assert log.get("calls", 0) == 0
        assert denials(metrics, "intruder") == 1
        # no header: unknown caller, allowed only by "*"
        assert httpx.get(f"{srv.url}/orders/1").status_code == 403
        assert denials(metrics, "") == 1
        r = httpx.get(f"{srv.url}/orders/1", headers={"x-mesh-caller": "billing"})
        assert r.status_code == 200 and log["calls"] == 1
        # recorded when the ASGI call returns, just after the response went out
        wait_until(lambda: count(metrics, HTTP_FAMILY, meshlib_caller="billing",
                                 http_response_status_code="200") == 1)

        set_policy(mesh, ["intruder"])  # live change: the next request sees it
        assert httpx.get(f"{srv.url}/orders/1",
                         headers={"x-mesh-caller": "intruder"}).status_code == 200
        assert httpx.get(f"{srv.url}/orders/1",
                         headers={"x-mesh-caller": "billing"}).status_code == 403
        set_policy(mesh, ["*"])
        assert httpx.get(f"{srv.url}/orders/1").status_code == 200


async def test_asgi_tls_peer_name_wins_over_the_caller_header(
        mesh: Mesh, metrics: MeshMetrics) -> None:
    set_policy(mesh, ["billing"])
    app = MeshASGIMiddleware(starlette_app({}), mesh, service=SERVICE, metrics=metrics)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def scope(cert_name: str | None) -> dict[str, Any]:
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "https", "path": "/orders/1", "raw_path": b"/orders/1",
            "query_string": b"", "root_path": "", "server": ("127.0.0.1", 443),
            "headers": [(b"host", b"orders"), (b"x-mesh-caller", b"billing")],
            "extensions": {"tls": {"client_cert_name": cert_name, "server_cert": None,
                                   "client_cert_chain": [], "client_cert_error": None,
                                   "tls_version": 0x0304, "cipher_suite": None}},
        }

    await app(scope("CN=intruder,O=acme"), receive, send)  # header claims billing: ignored
    assert sent[0]["status"] == 403 and json.loads(sent[1]["body"])["caller"] == "intruder"
    assert denials(metrics, "intruder") == 1
    sent.clear()
    await app(scope("CN=billing,O=acme"), receive, send)
    assert sent[0]["status"] == 200
    sent.clear()
    await app(scope(None), receive, send)  # no client certificate: the header counts
    assert sent[0]["status"] == 200


def test_asgi_mesh_client_caller_identity_end_to_end(
        mesh: Mesh, etcd_server: Any, etcd_prefix: str, metrics: MeshMetrics) -> None:
    """A meshlib client created with ``Mesh(service="billing")`` is recognised as billing."""
    set_policy(mesh, ["billing"])
    app = MeshASGIMiddleware(starlette_app({}), mesh, service=SERVICE, metrics=metrics)
    with UvicornThread(app) as srv:
        mesh.register(SERVICE, srv.port)
        with Mesh(etcd_server.endpoint, prefix=etcd_prefix, service="billing",
                  handle_sigterm=False) as billing, \
                Mesh(etcd_server.endpoint, prefix=etcd_prefix, service="intruder",
                     handle_sigterm=False) as intruder:
            billing.wait_for(SERVICE)
            intruder.wait_for(SERVICE)
            with billing.http_client() as c:
                assert c.get("http://orders/orders/7").status_code == 200
            with intruder.http_client() as c:
                assert c.get("http://orders/orders/7").status_code == 403
    wait_until(lambda: count(metrics, HTTP_FAMILY, meshlib_caller="billing") == 1)
    assert denials(metrics, "intruder") == 1


# --------------------------------------------------------------------------- WSGI


def flask_app(log: dict[str, Any]) -> Flask:
    app = Flask("orders")

    @app.get("/orders/<int:order_id>")
    def order(order_id: int) -> Any:
        log["calls"] = log.get("calls", 0) + 1
        d = current_deadline.get()
        log["current_span"] = trace.get_current_span().get_span_context().span_id
        return jsonify(id=order_id, remaining=None if d is None else d.at - time.monotonic())

    return app


def wsgi_app(log: dict[str, Any], mesh: Mesh | None, metrics: MeshMetrics) -> Flask:
    app = flask_app(log)
    app.wsgi_app = MeshWSGIMiddleware(app.wsgi_app, mesh, service=SERVICE,  # type: ignore[method-assign]
                                      metrics=metrics)
    return app


def test_wsgi_route_template_trace_and_deadline(
        metrics: MeshMetrics, exporter: InMemorySpanExporter) -> None:
    log: dict[str, Any] = {}
    with WerkzeugThread(wsgi_app(log, None, metrics)) as srv, httpx.Client() as c:
        for i in range(300):  # more distinct paths than the 200-value label cap
            r = c.get(f"{srv.url}/orders/{i}", headers={"traceparent": TRACEPARENT,
                                                       "x-mesh-timeout": "3S"})
            assert r.status_code == 200
            assert 2.0 < r.json()["remaining"] <= 3.0
        assert c.get(f"{srv.url}/unknown/1").status_code == 404

    def routes() -> dict[tuple[str, str], float]:
        return {(dict(k)["http_route"], dict(k)["http_response_status_code"]): v
                for k, v in series(metrics, HTTP_FAMILY).items()}

    def server_spans() -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]

    # The server records a call once the response is sent: the client may read it first.
    wait_until(lambda: len(server_spans()) == 301 and sum(routes().values()) == 301)
    assert routes() == {("/orders/<int:order_id>", "200"): 300, ("", "404"): 1}
    servers = server_spans()
    span = servers[0]
    assert span.name == "GET /orders/<int:order_id>"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert log["current_span"] == servers[-2].context.span_id  # attached during the handler


def test_wsgi_expired_deadline_answers_504_without_calling_the_app(
        metrics: MeshMetrics) -> None:
    log: dict[str, Any] = {}
    with WerkzeugThread(wsgi_app(log, None, metrics)) as srv:
        r = httpx.get(f"{srv.url}/orders/1", headers={"x-mesh-timeout": "0n"})
        assert r.status_code == 504
        # a malformed header is ignored, not an error
        assert httpx.get(f"{srv.url}/orders/1",
                         headers={"x-mesh-timeout": "soon"}).json()["remaining"] is None
    assert log["calls"] == 1
    wait_until(lambda: count(metrics, HTTP_FAMILY, http_response_status_code="504") == 1)


def test_wsgi_access_policy_denies_allows_and_follows_etcd_live(
        mesh: Mesh, metrics: MeshMetrics) -> None:
    log: dict[str, Any] = {}
    set_policy(mesh, ["billing"])
    with WerkzeugThread(wsgi_app(log, mesh, metrics)) as srv:
        r = httpx.get(f"{srv.url}/orders/1", headers={"x-mesh-caller": "intruder"})
        assert r.status_code == 403
        assert r.json()["caller"] == "intruder"
        assert log.get("calls", 0) == 0 and denials(metrics, "intruder") == 1
        assert httpx.get(f"{srv.url}/orders/1",
                         headers={"x-mesh-caller": "billing"}).status_code == 200
        set_policy(mesh, ["intruder"])
        assert httpx.get(f"{srv.url}/orders/1",
                         headers={"x-mesh-caller": "intruder"}).status_code == 200
        assert httpx.get(f"{srv.url}/orders/1",
                         headers={"x-mesh-caller": "billing"}).status_code == 403
    assert denials(metrics, "billing") == 1


# --------------------------------------------------------------------------- gRPC


class Servicer(pb_grpc.TestServiceServicer):
    """Sync handlers; every call is logged with the deadline and span it saw."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.remaining: list[float | None] = []
        self.spans: list[int] = []

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        d = current_deadline.get()
        self.remaining.append(None if d is None else d.at - time.monotonic())
        self.spans.append(trace.get_current_span().get_span_context().span_id)

    def UnaryCall(self, request: Any, context: Any) -> Any:
        self._enter("UnaryCall")
        if request.action == "status":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such order")
        if request.action == "sleep":
            time.sleep(request.sleep_ms / 1000)
        return pb.SimpleResponse(server_id="sync")

    def StreamingOutputCall(self, request: Any, context: Any) -> Any:
        self._enter("StreamingOutputCall")
        for size in request.response_sizes:
            yield pb.StreamingOutputCallResponse(payload=pb.Payload(body=b"x" * size))

    def StreamingInputCall(self, request_iterator: Any, context: Any) -> Any:
        self._enter("StreamingInputCall")
        total = sum(len(r.payload.body) for r in request_iterator)
        return pb.StreamingInputCallResponse(aggregated_payload_size=total)


@pytest.fixture
def sync_grpc(metrics: MeshMetrics, mesh: Mesh) -> Iterator[tuple[Servicer, Any]]:
    servicer = Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(1), interceptors=[
        MeshServerInterceptor(mesh, service=SERVICE, metrics=metrics)])
    pb_grpc.add_TestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, pb_grpc.TestServiceStub(channel)
    finally:
        channel.close()
        server.stop(None)


def test_grpc_sync_metrics_per_method_and_status(sync_grpc: Any, metrics: MeshMetrics) -> None:
    servicer, stub = sync_grpc
    stub.UnaryCall(pb.SimpleRequest())
    with pytest.raises(grpc.RpcError) as err:
        stub.UnaryCall(pb.SimpleRequest(action="status"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    out = list(stub.StreamingOutputCall(pb.StreamingOutputCallRequest(response_sizes=[1, 2, 3])))
    assert len(out) == 3
    reqs = iter([pb.StreamingInputCallRequest(payload=pb.Payload(body=b"ab"))] * 2)
    assert stub.StreamingInputCall(reqs).aggregated_payload_size == 4
    wait_until(lambda: count(metrics, RPC_FAMILY) == 4)
    got = {(dict(k)["rpc_method"], dict(k)["rpc_response_status_code"], dict(k)["error_type"]): v
           for k, v in series(metrics, RPC_FAMILY).items()}
    assert got == {("UnaryCall", "OK", ""): 1, ("UnaryCall", "NOT_FOUND", ""): 1,
                   ("StreamingOutputCall", "OK", ""): 1, ("StreamingInputCall", "OK", ""): 1}
    assert all(dict(k)["rpc_service"] == TEST_SERVICE for k in series(metrics, RPC_FAMILY))


def test_grpc_sync_trace_continues_and_deadline_propagates(
        sync_grpc: Any, exporter: InMemorySpanExporter) -> None:
    servicer, stub = sync_grpc
    stub.UnaryCall(pb.SimpleRequest(), timeout=5, metadata=(("traceparent", TRACEPARENT),))
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert span.name == f"{TEST_SERVICE}/UnaryCall"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert servicer.spans == [span.context.span_id]
    assert 3.0 < servicer.remaining[0] <= 5.1  # grpc-timeout rounds up
    stub.UnaryCall(pb.SimpleRequest())  # no deadline: none propagated
    assert servicer.remaining[1] is None


def test_grpc_sync_expired_deadline_is_refused_without_the_handler(
        sync_grpc: Any, metrics: MeshMetrics) -> None:
    servicer, stub = sync_grpc
    # The only worker thread is busy, so the next call waits past its deadline in the queue.
    busy = stub.UnaryCall.future(pb.SimpleRequest(action="sleep", sleep_ms=400))
    wait_until(lambda: servicer.calls == ["UnaryCall"])
    with pytest.raises(grpc.RpcError) as err:
        stub.StreamingInputCall(iter([pb.StreamingInputCallRequest()]), timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    busy.result()
    wait_until(lambda: count(metrics, RPC_FAMILY, rpc_method="StreamingInputCall") == 1)
    assert servicer.calls == ["UnaryCall"]  # the handler never ran
    assert count(metrics, RPC_FAMILY, rpc_method="StreamingInputCall",
                 rpc_response_status_code="DEADLINE_EXCEEDED") == 1


def test_grpc_sync_access_denied_allowed_and_live(
        sync_grpc: Any, mesh: Mesh, metrics: MeshMetrics) -> None:
    servicer, stub = sync_grpc
    set_policy(mesh, ["billing"])
    with pytest.raises(grpc.RpcError) as err:
        stub.UnaryCall(pb.SimpleRequest(), metadata=(("x-mesh-caller", "intruder"),))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "intruder" in err.value.details() and SERVICE in err.value.details()
    assert servicer.calls == []
    assert denials(metrics, "intruder") == 1
    with pytest.raises(grpc.RpcError):
        list(stub.StreamingOutputCall(pb.StreamingOutputCallRequest(response_sizes=[1])))
    assert denials(metrics, "") == 1  # no caller header: unknown, not in allow
    stub.UnaryCall(pb.SimpleRequest(), metadata=(("x-mesh-caller", "billing"),))
    assert servicer.calls == ["UnaryCall"]
    set_policy(mesh, ["*"])
    stub.UnaryCall(pb.SimpleRequest(), metadata=(("x-mesh-caller", "intruder"),))
    assert servicer.calls == ["UnaryCall", "UnaryCall"]
    assert count(metrics, RPC_FAMILY, rpc_response_status_code="PERMISSION_DENIED") == 2
    assert count(metrics, RPC_FAMILY, meshlib_caller="billing",
                 rpc_response_status_code="OK") == 1


class AioServicer(pb_grpc.TestServiceServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.remaining: list[float | None] = []
        self.cancelled = False

    async def UnaryCall(self, request: Any, context: Any) -> Any:
        self.calls.append("UnaryCall")
        d = current_deadline.get()
        self.remaining.append(None if d is None else d.at - time.monotonic())
        if request.action == "sleep":
            try:
                await asyncio.sleep(request.sleep_ms / 1000)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if request.action == "status":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such order")
        return pb.SimpleResponse(server_id="aio")

    async def StreamingOutputCall(self, request: Any, context: Any) -> Any:
        self.calls.append("StreamingOutputCall")
        for size in request.response_sizes:
            yield pb.StreamingOutputCallResponse(payload=pb.Payload(body=b"x" * size))

    async def FullDuplexCall(self, request_iterator: Any, context: Any) -> None:
        self.calls.append("FullDuplexCall")
        async for req in request_iterator:
            await context.write(pb.StreamingOutputCallResponse(
                payload=pb.Payload(body=b"y" * req.response_sizes[0])))


async def test_grpc_aio_metrics_deadline_access_and_cancellation(
        mesh: Mesh, metrics: MeshMetrics, exporter: InMemorySpanExporter) -> None:
    servicer = AioServicer()
    server = grpc.aio.server(interceptors=[
        AioMeshServerInterceptor(mesh, service=SERVICE, metrics=metrics)])
    pb_grpc.add_TestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TestServiceStub(channel)
            await stub.UnaryCall(pb.SimpleRequest(), timeout=5,
                                 metadata=(("traceparent", TRACEPARENT),))
            assert 3.0 < servicer.remaining[0] <= 5.1  # grpc-timeout rounds up
            (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
            assert format(span.parent.span_id, "016x") == PARENT_ID
            with pytest.raises(grpc.RpcError) as err:
                await stub.UnaryCall(pb.SimpleRequest(action="status"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            msgs = [m async for m in stub.StreamingOutputCall(
                pb.StreamingOutputCallRequest(response_sizes=[1, 2]))]
            assert [len(m.payload.body) for m in msgs] == [1, 2]
            call = stub.FullDuplexCall()
            await call.write(pb.StreamingOutputCallRequest(response_sizes=[3]))
            assert len((await call.read()).payload.body) == 3
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            # grpcio cancels the handler at the deadline; recorded as DEADLINE_EXCEEDED
            with pytest.raises(grpc.RpcError) as err:
                await stub.UnaryCall(pb.SimpleRequest(action="sleep", sleep_ms=3000),
                                     timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(200):
                if servicer.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert servicer.cancelled

            await asyncio.to_thread(set_policy, mesh, ["billing"])
            calls_before = len(servicer.calls)
            with pytest.raises(grpc.RpcError) as err:
                await stub.UnaryCall(pb.SimpleRequest(),
                                     metadata=(("x-mesh-caller", "intruder"),))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(servicer.calls) == calls_before
            await stub.UnaryCall(pb.SimpleRequest(), metadata=(("x-mesh-caller", "billing"),))
    finally:
        await server.stop(None)
    got: dict[tuple[str, str], float] = {}
    for k, v in series(metrics, RPC_FAMILY).items():
        key = (dict(k)["rpc_method"], dict(k)["rpc_response_status_code"])
        got[key] = got.get(key, 0) + v
    assert got == {("UnaryCall", "OK"): 2, ("UnaryCall", "NOT_FOUND"): 1,
                   ("UnaryCall", "DEADLINE_EXCEEDED"): 1, ("UnaryCall", "PERMISSION_DENIED"): 1,
                   ("StreamingOutputCall", "OK"): 1, ("FullDuplexCall", "OK"): 1}
    assert denials(metrics, "intruder") == 1


# --------------------------------------------------------------------------- gRPC over mTLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and client certificates CN=billing / intruder."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "billing", "intruder"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        ext = ["-extfile", "san.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)
    return d


def test_grpc_mtls_peer_name_wins_over_the_caller_metadata(
        pki: Path, mesh: Mesh, metrics: MeshMetrics) -> None:
    set_policy(mesh, ["billing"])
    servicer = Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[
        MeshServerInterceptor(mesh, service=SERVICE, metrics=metrics)])
    pb_grpc.add_TestServiceServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()

    def stub_as(client: str) -> tuple[Any, Any]:
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(), (pki / f"{client}.key").read_bytes(),
            (pki / f"{client}.pem").read_bytes()))
        return channel, pb_grpc.TestServiceStub(channel)

    try:
        channel, stub = stub_as("intruder")
        with channel:
            with pytest.raises(grpc.RpcError) as err:  # claims billing; certificate says not
                stub.UnaryCall(pb.SimpleRequest(), metadata=(("x-mesh-caller", "billing"),))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        channel, stub = stub_as("billing")
        with channel:
            stub.UnaryCall(pb.SimpleRequest(), metadata=(("x-mesh-caller", "intruder"),))
    finally:
        server.stop(None)
    assert servicer.calls == ["UnaryCall"]
    assert denials(metrics, "intruder") == 1 and denials(metrics, "billing") == 0
    assert count(metrics, RPC_FAMILY, meshlib_caller="billing",
                 rpc_response_status_code="OK") == 1
