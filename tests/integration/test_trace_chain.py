"""One trace across a three-hop chain: test client -> ASGI service -> gRPC service.

Everything is real and in this process, on loopback: etcd (the session server, a prefix per
test), ``chain-orders`` (Starlette behind ``MeshASGIMiddleware``, served by uvicorn in a
thread) calling ``chain-ledger`` (a grpcio server behind ``MeshServerInterceptor``) through
``mesh.async_grpc_channel`` on uvicorn's event loop, each service found through etcd. The
OpenTelemetry SDK records into an ``InMemorySpanExporter``.

Checked:

* one trace id everywhere, and the exact parent chain: test root span -> HTTP call span
  (INTERNAL) -> HTTP attempt (CLIENT) -> ASGI server span (SERVER) -> RPC call span
  (INTERNAL) -> RPC attempt (CLIENT) -> gRPC server span (SERVER), with the caller identity of
  each hop on the server spans;
* access denied at hop 3 (the ledger allows another caller): PERMISSION_DENIED, turned into 403
  by hop 2, reaches the client; the trace stays whole and the ledger handler never runs;
* a deadline set at hop 1 (``x-mesh-timeout: 300m``) is inherited by hop 2 and sent on to hop
  3 as the gRPC deadline; it expires at hop 3 (whose handler would sleep 5 s) and the client
  gets 504 after ~0.3 s.

Per-layer denials and deadlines (one server, no chain) are in test_server_middleware.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from grpc_servers import pb, pb_grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshlib.context import current_deadline
from meshlib.mesh import Mesh
from meshlib.server import MeshASGIMiddleware, MeshServerInterceptor
from meshlib.telemetry import tracing
from meshlib.telemetry.metrics import MeshMetrics

WEB, ORDERS, LEDGER = "chain-web", "chain-orders", "chain-ledger"
RPC_NAME = "meshtest.TestService/UnaryCall"
_HTTP_STATUS = {grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.PERMISSION_DENIED: 403}


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    until = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < until, f"{what} not reached in {timeout}s"
        time.sleep(0.01)


# --------------------------------------------------------------------------- hop 3: gRPC


class Ledger(pb_grpc.TestServiceServicer):
    """UnaryCall answers at once, or with ``action="sleep"`` waits ``sleep_ms`` while the RPC
    is active. Logs the deadline and the current span each call saw."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []
        self.spans: list[int] = []
        self.ended_early = threading.Event()

    def UnaryCall(self, request: Any, context: Any) -> Any:
        d = current_deadline.get()
        self.remaining.append(None if d is None else d.at - time.monotonic())
        self.spans.append(trace.get_current_span().get_span_context().span_id)
        if request.action == "sleep":
            end = time.monotonic() + request.sleep_ms / 1000
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.005)
            if time.monotonic() < end:
                self.ended_early.set()
        return pb.SimpleResponse(server_id="ledger")


# --------------------------------------------------------------------------- hop 2: ASGI


def orders_app(mesh: Mesh) -> Starlette:
    """GET /orders/{id}[?action=sleep]: one RPC to the ledger through the mesh; gRPC errors
    become 504 (deadline), 403 (denied) or 502."""

    async def order(request: Request) -> JSONResponse:
        async with mesh.async_grpc_channel(LEDGER) as channel:  # on uvicorn's loop
            stub = pb_grpc.TestServiceStub(channel)
            action = request.query_params.get("action", "")
            try:
                reply = await stub.UnaryCall(pb.SimpleRequest(action=action, sleep_ms=5000))
            except grpc.RpcError as exc:
                code = exc.code()
                return JSONResponse({"error": code.name}, status_code=_HTTP_STATUS.get(code, 502))
        return JSONResponse({"id": request.path_params["id"], "ledger": reply.server_id})

    return Starlette(routes=[Route("/orders/{id}", order)])


class UvicornThread:
    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning",
                                                    loop="asyncio", http="h11"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "uvicorn started")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    exporter = InMemorySpanExporter()
    prov = TracerProvider()
    prov.add_span_processor(SimpleSpanProcessor(exporter))
    prov.exporter = exporter  # type: ignore[attr-defined]
    tracing.configure(tracer_provider=prov, propagate_without_sdk=False)
    yield prov
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)


class Chain:
    def __init__(self, etcd: str, prefix: str) -> None:
        def mesh(service: str) -> Mesh:
            return Mesh(etcd, prefix=prefix, service=service, handle_sigterm=False)

        self.web, self.orders, self.ledger = mesh(WEB), mesh(ORDERS), mesh(LEDGER)
        self.ledger_metrics = MeshMetrics(CollectorRegistry())
        self.servicer = Ledger()
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[
            MeshServerInterceptor(self.ledger, service=LEDGER, metrics=self.ledger_metrics)])
        pb_grpc.add_TestServiceServicer_to_server(self.servicer, self.grpc_server)
        grpc_port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.grpc_server.start()
        self.http = UvicornThread(MeshASGIMiddleware(
            orders_app(self.orders), self.orders, service=ORDERS,
            metrics=MeshMetrics(CollectorRegistry())))
        self.http.start()
        self.set_ledger_allow([ORDERS])
        self.ledger.register(LEDGER, grpc_port, protocol="grpc")
        self.orders.register(ORDERS, self.http.port)
        self.orders.wait_for(LEDGER)
        self.web.wait_for(ORDERS)

    def set_ledger_allow(self, allow: list[str]) -> None:
        self.ledger.client.put(self.ledger.layout.policy_key(LEDGER),
                               json.dumps({"access": {"allow": allow}}).encode())
        wait_until(lambda: tuple(self.ledger.snapshot(LEDGER).policy.access.allow) == tuple(allow),
                   10, f"ledger policy allow={allow}")

    def close(self) -> None:
        self.http.stop()
        self.grpc_server.stop(None)
        for m in (self.web, self.orders, self.ledger):
            m.close()


@pytest.fixture
def chain(etcd_server: Any, etcd_prefix: str, provider: TracerProvider) -> Iterator[Chain]:
    c = Chain(etcd_server.endpoint, etcd_prefix)
    try:
        yield c
    finally:
        c.close()


def finished(provider: TracerProvider, n: int) -> list[ReadableSpan]:
    """The finished spans once there are ``n`` (server spans end just after responding)."""
    exporter = provider.exporter  # type: ignore[attr-defined]
    return list(wait_until(lambda: len(exporter.get_finished_spans()) >= n
                           and exporter.get_finished_spans(), 5, f"{n} finished spans"))


def one(spans: list[ReadableSpan], pred: Callable[[ReadableSpan], bool], what: str) -> ReadableSpan:
    found = [s for s in spans if pred(s)]
    assert len(found) == 1, f"{what}: {len(found)} spans: {[s.name for s in found]}"
    return found[0]


def chain_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """[http call, http attempt, asgi server, rpc call, rpc attempt, grpc server]."""
    attrs = lambda s: s.attributes or {}  # noqa: E731
    return [
        one(spans, lambda s: s.kind == SpanKind.INTERNAL and attrs(s).get("server.address") == ORDERS
            and "http.request.method" in attrs(s), "HTTP call span"),
        one(spans, lambda s: s.kind == SpanKind.CLIENT and "http.request.method" in attrs(s),
            "HTTP attempt span"),
        one(spans, lambda s: s.kind == SpanKind.SERVER and "http.request.method" in attrs(s),
            "ASGI server span"),
        one(spans, lambda s: s.kind == SpanKind.INTERNAL and attrs(s).get("server.address") == LEDGER,
            "RPC call span"),
        one(spans, lambda s: s.kind == SpanKind.CLIENT and "rpc.method" in attrs(s),
            "RPC attempt span"),
        one(spans, lambda s: s.kind == SpanKind.SERVER and "rpc.method" in attrs(s),
            "gRPC server span"),
    ]


def assert_one_linked_trace(root: ReadableSpan, hops: list[ReadableSpan]) -> None:
    trace_id = root.context.trace_id
    for span in hops:
        assert span.context.trace_id == trace_id, f"{span.name} is in another trace"
    parent = root
    for span in hops:
        assert span.parent is not None, f"{span.name} has no parent"
        assert span.parent.span_id == parent.context.span_id, (
            f"{span.name} ({span.kind}) is a child of {span.parent.span_id:x}, "
            f"expected {parent.name} ({parent.kind})")
        parent = span


# --------------------------------------------------------------------------- tests


def test_one_trace_across_client_asgi_and_grpc(chain: Chain, provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("checkout") as root_span:
        with chain.web.http_client(timeout=5) as http:
            r = http.get(f"http://{ORDERS}/orders/7")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "7", "ledger": "ledger"}
    spans = finished(provider, 7)
    root = one(spans, lambda s: s.name == "checkout", "root span")
    assert root.context.span_id == root_span.get_span_context().span_id
    hops = chain_spans(spans)
    assert_one_linked_trace(root, hops)
    call, attempt, asgi, rpc_call, rpc_attempt, server = hops
    assert [s.name for s in hops] == [f"GET {ORDERS}", "GET", "GET /orders/{id}", RPC_NAME,
                                      RPC_NAME, RPC_NAME]
    assert asgi.attributes["meshlib.caller"] == WEB
    assert asgi.attributes["http.route"] == "/orders/{id}"
    assert server.attributes["meshlib.caller"] == ORDERS
    assert server.attributes["rpc.response.status_code"] == "OK"
    assert attempt.attributes["network.peer.port"] == chain.http.port
    assert rpc_attempt.attributes["meshlib.attempt"] == 1
    assert call.attributes["http.response.status_code"] == 200
    assert rpc_call.attributes["rpc.response.status_code"] == "OK"
    # the ledger handler ran under the gRPC server span
    assert chain.servicer.spans == [server.context.span_id]


def test_access_denied_at_hop_3_reaches_the_client_in_the_same_trace(
        chain: Chain, provider: TracerProvider) -> None:
    chain.set_ledger_allow(["chain-billing"])  # orders may no longer call the ledger
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("checkout"):
        with chain.web.http_client(timeout=5) as http:
            r = http.get(f"http://{ORDERS}/orders/8")
    assert r.status_code == 403
    assert r.json() == {"error": "PERMISSION_DENIED"}
    spans = finished(provider, 7)
    root = one(spans, lambda s: s.name == "checkout", "root span")
    hops = chain_spans(spans)
    assert_one_linked_trace(root, hops)
    call, _attempt, asgi, rpc_call, _rpc_attempt, server = hops
    assert server.attributes["rpc.response.status_code"] == "PERMISSION_DENIED"
    assert server.attributes["meshlib.caller"] == ORDERS
    assert rpc_call.attributes["rpc.response.status_code"] == "PERMISSION_DENIED"
    assert asgi.attributes["http.response.status_code"] == 403
    assert call.attributes["http.response.status_code"] == 403
    assert chain.servicer.spans == []  # the handler never ran
    denials = chain.ledger_metrics.registry.get_sample_value(
        "meshlib_server_access_denials_total", {"meshlib_caller": ORDERS})
    assert denials == 1


def test_deadline_set_at_hop_1_expires_at_hop_3_and_504_comes_back(
        chain: Chain, provider: TracerProvider) -> None:
    """Hop 1 is an edge client that states its deadline in ``x-mesh-timeout`` (a mesh client
    sends the same header; a plain one is used so that hop 1 does not time out by itself at
    the same instant and the 504 coming back is observable)."""
    tracer = provider.get_tracer("test")
    headers = {"x-mesh-timeout": "300m", "x-mesh-caller": WEB}
    with tracer.start_as_current_span("edge"):
        propagate.inject(headers)
        t0 = time.monotonic()
        r = httpx.get(f"http://127.0.0.1:{chain.http.port}/orders/9?action=sleep",
                      headers=headers, timeout=10)
        elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert 0.25 < elapsed < 3.0, elapsed  # the ledger handler would have slept 5 s
    # hop 3 saw the deadline set at hop 1 (minus the time spent on the way) and stopped early
    (remaining,) = chain.servicer.remaining
    assert remaining is not None and 0 < remaining <= 0.3, remaining
    wait_until(chain.servicer.ended_early.is_set, 5, "the ledger handler stopped early")
    spans = finished(provider, 5)  # edge, ASGI server, RPC call, RPC attempt, gRPC server
    root = one(spans, lambda s: s.name == "edge", "root span")
    asgi = one(spans, lambda s: s.kind == SpanKind.SERVER and s.name.startswith("GET"),
               "ASGI server span")
    rpc_call = one(spans, lambda s: s.kind == SpanKind.INTERNAL and s.name == RPC_NAME,
                   "RPC call span")
    server = one(spans, lambda s: s.kind == SpanKind.SERVER and s.name == RPC_NAME,
                 "gRPC server span")
    for span in (asgi, rpc_call, server):
        assert span.context.trace_id == root.context.trace_id, span.name
    assert asgi.parent.span_id == root.context.span_id
    assert asgi.attributes["http.response.status_code"] == 504
    assert asgi.attributes["error.type"] == "timeout"
    # Hop 2's inbound deadline (the middleware's asyncio.timeout) and its outbound gRPC
    # deadline are the same instant; when the middleware cancels the handler first, the mesh
    # channel sees the call's deadline passed and records DEADLINE_EXCEEDED, not CANCELLED.
    # Hop 3 ends DEADLINE_EXCEEDED unless hop 2's cancellation reaches it first.
    assert rpc_call.attributes["rpc.response.status_code"] == "DEADLINE_EXCEEDED"
    assert server.attributes["rpc.response.status_code"] in ("DEADLINE_EXCEEDED", "CANCELLED")
    assert server.parent.span_id in {s.context.span_id for s in spans
                                     if s.kind == SpanKind.CLIENT and s.name == RPC_NAME}
