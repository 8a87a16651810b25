"""Metrics and spans of gRPC calls through the mesh: real etcd, real grpcio servers on loopback.

Every case runs against the three client drivers (``MeshChannel`` blocking calls, its
``future()`` for unary calls, and ``AioMeshChannel`` on an event loop thread) behind the same
small client class, so the drivers are held to the same series, labels and spans. Metrics are
read from the process registry (``prometheus_client.REGISTRY``) as deltas; each test uses
its own mesh service name, so the series of one test never mix with another's.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_servers import TestServer, pb, pb_grpc
from http_servers import set_policy
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

from meshlib.core.outcome import classify_grpc
from meshlib.telemetry import tracing

RPC_SERVICE = "meshtest.TestService"
CALL_FAMILY = "rpc_client_call_duration_seconds"
ATTEMPT_FAMILY = "meshlib_client_attempt_duration_seconds"
UNAVAILABLE_OUTCOME = classify_grpc("UNAVAILABLE").value


# --------------------------------------------------------------------------- helpers


def sample(name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def call_labels(service: str, method: str, code: str, error_type: str = "") -> dict[str, str]:
    return {"rpc_system": "grpc", "rpc_service": RPC_SERVICE, "rpc_method": method,
            "server_address": service, "rpc_response_status_code": code,
            "error_type": error_type}


def call_count(service: str, method: str, code: str, error_type: str = "") -> float:
    v = REGISTRY.get_sample_value(f"{CALL_FAMILY}_count",
                                  call_labels(service, method, code, error_type))
    return v or 0.0


def wait_until(pred: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    return pred()


def new_service() -> str:
    return f"tel-{uuid.uuid4().hex[:10]}"


class Client:
    """One mesh channel to ``service``, driven as ``kind`` ("sync", "future" or "aio")."""

    def __init__(self, mesh: Any, service: str, kind: str) -> None:
        self.kind = kind
        self.loop: asyncio.AbstractEventLoop | None = None
        if kind == "aio":
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self.thread.start()

            async def make() -> Any:
                return mesh.async_grpc_channel(service)

            self.channel = self.run(make())
        else:
            self.channel = mesh.grpc_channel(service)
        self.stub = pb_grpc.TestServiceStub(self.channel)

    def run(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def unary(self, req: Any) -> Any:
        if self.kind == "sync":
            return self.stub.UnaryCall(req)
        if self.kind == "future":
            return self.stub.UnaryCall.future(req).result(30)

        async def go() -> Any:
            return await self.stub.UnaryCall(req)

        return self.run(go())

    def stream(self, req: Any, on_first: Callable[[], None] = lambda: None) -> list[Any]:
        """Read a server stream, calling ``on_first`` after the first message."""
        if self.kind != "aio":
            out = []
            for msg in self.stub.StreamingOutputCall(req):
                out.append(msg)
                if len(out) == 1:
                    on_first()
            return out

        async def go() -> list[Any]:
            out = []
            async for msg in self.stub.StreamingOutputCall(req):
                out.append(msg)
                if len(out) == 1:
                    await asyncio.get_running_loop().run_in_executor(None, on_first)
            return out

        return self.run(go())  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.loop is not None:
            self.run(self.channel.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()
        else:
            self.channel.close()


@pytest.fixture
def clients(mesh: Any) -> Iterator[Callable[[str, str], Client]]:
    made: list[Client] = []

    def make(service: str, kind: str) -> Client:
        c = Client(mesh, service, kind)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def servers(mesh: Any) -> Iterator[Callable[[str, str], TestServer]]:
    started: list[TestServer] = []

    def start(service: str, server_id: str) -> TestServer:
        s = TestServer(server_id, workers=4).start()
        started.append(s)
        mesh.register(service, s.port, protocol="grpc", instance_id=server_id)
        return s

    yield start
    for s in started:
        s.stop()


class RecordingServicer(pb_grpc.TestServiceServicer):
    """Keeps the metadata of every call; fails the first ``fail_first`` unary calls with
    UNAVAILABLE before any header (so the mesh retries them)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.metadata: list[dict[str, str]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def UnaryCall(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.metadata.append(dict(context.invocation_metadata()))
            fail = len(self.metadata) <= self.fail_first
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "failing first attempts")
        return pb.SimpleResponse(server_id="recording")


@pytest.fixture
def recording_server(mesh: Any) -> Iterator[Callable[[str, int], RecordingServicer]]:
    started: list[grpc.Server] = []

    def start(service: str, fail_first: int = 0) -> RecordingServicer:
        servicer = RecordingServicer(fail_first)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_TestServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        mesh.register(service, port, protocol="grpc", instance_id="recording")
        mesh.wait_for(service)
        return servicer

    yield start
    for s in started:
        s.stop(0).wait(5)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.configure(tracer_provider=provider, propagate_without_sdk=False)
    yield exp
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)
    provider.shutdown()


KINDS = ["sync", "future", "aio"]


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("kind", KINDS)
def test_unary_call_recorded_with_semconv_labels(mesh, servers, clients, kind):
    svc = new_service()
    servers(svc, "a")
    mesh.wait_for(svc)
    c = clients(svc, kind)
    labels = call_labels(svc, "UnaryCall", "OK")
    before = REGISTRY.get_sample_value(f"{CALL_FAMILY}_count", labels) or 0.0
    before_sum = REGISTRY.get_sample_value(f"{CALL_FAMILY}_sum", labels) or 0.0
    assert c.unary(pb.SimpleRequest(response_size=1)).server_id == "a"
    assert REGISTRY.get_sample_value(f"{CALL_FAMILY}_count", labels) == before + 1
    assert REGISTRY.get_sample_value(f"{CALL_FAMILY}_sum", labels) > before_sum
    attempt = {"server_address": svc, "attempt": "1", "outcome": "success"}
    assert REGISTRY.get_sample_value(f"{ATTEMPT_FAMILY}_count", attempt) == 1
    assert sample("meshlib_client_retries_total", server_address=svc) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_retried_call_records_two_attempts_and_one_retry(mesh, servers, clients, kind):
    svc = new_service()
    a, _ = servers(svc, "a"), servers(svc, "b")
    mesh.wait_for(svc, 2)
    a.mode = "unavailable"
    c = clients(svc, kind)
    # the balancer picks "a" first for some calls; the first such call is retried on "b"
    for _ in range(60):
        calls_before = call_count(svc, "UnaryCall", "OK")
        attempts_before = sample(f"{ATTEMPT_FAMILY}_count", server_address=svc)
        retries_before = sample("meshlib_client_retries_total", server_address=svc)
        resp = c.unary(pb.SimpleRequest())
        if resp.previous_attempts:
            break
    else:
        pytest.fail("no call was sent to the failing endpoint first in 60 calls")
    assert resp.server_id == "b"
    assert call_count(svc, "UnaryCall", "OK") == calls_before + 1
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc) == attempts_before + 2
    assert sample("meshlib_client_retries_total", server_address=svc) == retries_before + 1
    assert sample("meshlib_client_retries_total", server_address=svc,
                  reason=UNAVAILABLE_OUTCOME) >= 1
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc, attempt="2",
                  outcome="success") >= 1
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc, attempt="1",
                  outcome=UNAVAILABLE_OUTCOME) >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_failing_status_recorded_with_error_type(mesh, servers, clients, kind):
    svc = new_service()
    servers(svc, "a")
    mesh.wait_for(svc)
    c = clients(svc, kind)
    code = grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        c.unary(pb.SimpleRequest(action="status", code=code.value[0], message="no such"))
    assert info.value.code() == code
    assert call_count(svc, "UnaryCall", "NOT_FOUND", "NOT_FOUND") == 1
    assert call_count(svc, "UnaryCall", "OK") == 0
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc, attempt="1") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_no_endpoints_recorded_as_mesh_failure(mesh, clients, kind):
    svc = new_service()
    c = clients(svc, kind)
    with pytest.raises(grpc.RpcError) as info:
        c.unary(pb.SimpleRequest())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert call_count(svc, "UnaryCall", "UNAVAILABLE", "no_endpoints") == 1
    assert sample("meshlib_client_no_endpoints_total", server_address=svc) == 1
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc) == 0  # nothing was sent


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_stream_recorded_when_it_finishes(mesh, servers, clients, kind):
    svc = new_service()
    servers(svc, "a")
    mesh.wait_for(svc)
    c = clients(svc, kind)
    seen_mid_stream: list[float] = []
    msgs = c.stream(
        pb.StreamingOutputCallRequest(response_sizes=[1, 1, 1], interval_ms=300),
        on_first=lambda: seen_mid_stream.append(
            call_count(svc, "StreamingOutputCall", "OK")
            + sample(f"{ATTEMPT_FAMILY}_count", server_address=svc)),
    )
    assert len(msgs) == 3
    assert seen_mid_stream == [0]  # neither the call nor its attempt had ended yet
    assert wait_until(lambda: call_count(svc, "StreamingOutputCall", "OK") == 1)
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc, attempt="1",
                  outcome="success") == 1
    # a stream failing after its first message: recorded once, with the status it ended with
    with pytest.raises(grpc.RpcError):
        c.stream(pb.StreamingOutputCallRequest(response_sizes=[1, 1],
                                               action="fail_after_first"))
    assert wait_until(
        lambda: call_count(svc, "StreamingOutputCall", "UNAVAILABLE", "UNAVAILABLE") == 1)
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc) == 2


def test_sync_and_aio_give_the_same_series(mesh, servers, clients):
    services = {kind: new_service() for kind in KINDS}
    for kind, svc in services.items():
        servers(svc, kind)
        mesh.wait_for(svc)
        c = clients(svc, kind)
        c.unary(pb.SimpleRequest())
        with pytest.raises(grpc.RpcError):
            c.unary(pb.SimpleRequest(action="status", code=grpc.StatusCode.NOT_FOUND.value[0]))

    def series(svc: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        out = set()
        for metric in REGISTRY.collect():
            for s in metric.samples:
                if s.labels.get("server_address") == svc:
                    labels = tuple(sorted((k, v if k != "server_address" else "*")
                                          for k, v in s.labels.items() if k != "le"))
                    out.add((s.name, labels))
        return out

    sync, future, aio = (series(services[k]) for k in KINDS)
    assert sync == aio == future
    names = {name for name, _ in sync}
    assert {f"{CALL_FAMILY}_count", f"{ATTEMPT_FAMILY}_count"} <= names
    call_label_names = {tuple(k for k, _ in labels) for name, labels in sync
                        if name == f"{CALL_FAMILY}_count"}
    assert call_label_names == {("error_type", "rpc_method", "rpc_response_status_code",
                                 "rpc_service", "rpc_system", "server_address")}


@pytest.mark.parametrize("kind", ["future", "aio", "stream"])
def test_cancelled_call_recorded_as_cancelled(mesh, servers, clients, kind):
    svc = new_service()
    servers(svc, "a")
    mesh.wait_for(svc)
    c = clients(svc, "aio" if kind == "aio" else "sync")
    slow = pb.SimpleRequest(action="sleep", sleep_ms=3000)
    if kind == "future":
        fut = c.stub.UnaryCall.future(slow)
        time.sleep(0.1)
        assert fut.cancel()
    elif kind == "stream":
        call = c.stub.StreamingOutputCall(
            pb.StreamingOutputCallRequest(response_sizes=[1, 1], interval_ms=3000))
        assert call.cancel()
    else:
        async def go() -> None:
            call = c.stub.UnaryCall(slow)
            await asyncio.sleep(0.1)
            assert call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

        c.run(go())
    method = "StreamingOutputCall" if kind == "stream" else "UnaryCall"
    assert wait_until(lambda: call_count(svc, method, "CANCELLED", "CANCELLED") == 1)
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc, attempt="1",
                  outcome="local") == 1
    assert call_count(svc, method, "OK") == 0


@pytest.mark.parametrize("kind", ["sync", "future", "aio", "stream", "aio_stream"])
def test_call_aborted_in_the_client_is_recorded_alike_by_every_driver(
        mesh, servers, clients, kind):
    """A call that fails in the client before any status (its channel was closed, so no
    endpoint channel can be opened) frees its concurrency slot and is recorded the same way
    by every driver: one call, CANCELLED with the exception's class as ``error_type``, and no
    attempt. (The aio driver once let this escape unrecorded with the slot held.)"""
    svc = new_service()
    servers(svc, "a")
    mesh.wait_for(svc)
    c = clients(svc, "aio" if kind.startswith("aio") else "sync")
    if c.loop is not None:
        c.run(c.channel.close())
    else:
        c.channel.close()
    req = pb.SimpleRequest()
    with pytest.raises(RuntimeError, match=f"gRPC channel to service '{svc}' is closed"):
        if kind.endswith("stream"):
            c.stream(pb.StreamingOutputCallRequest(response_sizes=[1]))
        else:
            c.unary(req)
    method = "StreamingOutputCall" if kind.endswith("stream") else "UnaryCall"
    assert call_count(svc, method, "CANCELLED", "RuntimeError") == 1
    assert sample(f"{CALL_FAMILY}_count", server_address=svc) == 1  # nothing else
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc) == 0
    assert mesh.destination(svc).inflight == 0


@pytest.mark.parametrize("shape", ["unary", "stream"])
def test_aio_call_cancelled_during_an_injected_delay_is_recorded(mesh, servers, clients, shape):
    """A task cancelled while its call waits out a fault-injection delay (before any attempt)
    ends the call: recorded once as CANCELLED with no attempt, like a cancelled sync future.
    (The aio stream once left such a call open and unrecorded.)"""
    svc = new_service()
    servers(svc, "a")
    mesh.wait_for(svc)
    set_policy(mesh, svc, {"fault": {"delay": {"percent": 100, "duration": "30s"}}})
    c = clients(svc, "aio")
    method = "StreamingOutputCall" if shape == "stream" else "UnaryCall"

    async def go() -> None:
        if shape == "unary":
            task = asyncio.ensure_future(c.stub.UnaryCall(pb.SimpleRequest()))
        else:
            async def read_all() -> list[Any]:
                req = pb.StreamingOutputCallRequest(response_sizes=[1])
                return [m async for m in c.stub.StreamingOutputCall(req)]

            task = asyncio.ensure_future(read_all())
        for _ in range(3):  # the task runs until it waits in the delay (loop order, no timer)
            await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    c.run(go())
    assert call_count(svc, method, "CANCELLED", "CANCELLED") == 1
    assert sample(f"{CALL_FAMILY}_count", server_address=svc) == 1
    assert sample(f"{ATTEMPT_FAMILY}_count", server_address=svc) == 0
    assert mesh.destination(svc).inflight == 0


# --------------------------------------------------------------------------- spans


def traceparent(span: Any) -> str:
    ctx = span.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


@pytest.mark.parametrize("kind", KINDS)
def test_call_span_with_attempt_spans_and_propagated_context(
        mesh, recording_server, clients, exporter, kind):
    svc = new_service()
    servicer = recording_server(svc, 1)  # the first attempt fails, the retry succeeds
    c = clients(svc, kind)
    exporter.clear()
    assert c.unary(pb.SimpleRequest()).server_id == "recording"

    spans = exporter.get_finished_spans()
    calls = [s for s in spans if s.kind is SpanKind.INTERNAL]
    attempts = sorted((s for s in spans if s.kind is SpanKind.CLIENT),
                      key=lambda s: s.attributes["meshlib.attempt"])
    assert len(calls) == 1 and len(attempts) == 2 and len(spans) == 3
    call = calls[0]
    assert call.name == f"{RPC_SERVICE}/UnaryCall"
    assert dict(call.attributes) == {
        "rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": "UnaryCall",
        "server.address": svc, "rpc.response.status_code": "OK"}
    assert call.status.status_code is not StatusCode.ERROR
    for n, att in enumerate(attempts, 1):
        assert att.name == call.name
        assert att.parent is not None and att.parent.span_id == call.context.span_id
        assert att.context.trace_id == call.context.trace_id
        assert att.attributes["meshlib.attempt"] == n
        assert att.attributes["network.peer.address"] == "127.0.0.1"
        assert att.attributes["server.port"] > 0
    assert attempts[0].attributes["rpc.response.status_code"] == "UNAVAILABLE"
    assert attempts[0].attributes["error.type"] == "UNAVAILABLE"
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert attempts[1].attributes["rpc.response.status_code"] == "OK"
    # each attempt carried its own span context to the server
    assert [md.get("traceparent") for md in servicer.metadata] == [
        traceparent(a) for a in attempts]
    assert servicer.metadata[1].get("grpc-previous-rpc-attempts") == "1"


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_mesh_failure_span_has_reason_as_error_type(mesh, clients, exporter, kind):
    svc = new_service()
    c = clients(svc, kind)
    exporter.clear()
    with pytest.raises(grpc.RpcError):
        c.unary(pb.SimpleRequest())
    (span,) = exporter.get_finished_spans()
    assert span.kind is SpanKind.INTERNAL
    assert span.attributes["error.type"] == "no_endpoints"
    assert span.attributes["rpc.response.status_code"] == "UNAVAILABLE"
    assert span.status.status_code is StatusCode.ERROR


def test_no_trace_context_sent_without_sdk(mesh, recording_server, clients):
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)
    svc = new_service()
    servicer = recording_server(svc, 0)
    c = clients(svc, "sync")
    c.unary(pb.SimpleRequest())
    assert "traceparent" not in servicer.metadata[0]
