"""gRPC through the shim's named upstream listener (issue 12, section 1 "Outbound gRPC").

A plain grpcio client (the "app", knowing nothing of the mesh) calls ``127.0.0.1:<listener>``;
the listener forwards raw bytes through the library's aio mesh channel to the real grpcio
servers registered in a real etcd as ``orders``. Each test checks what the app sees against
what the servers saw: the four call shapes, metadata, status/details/trailers (including
``grpc-status-details-bin``), deadlines (clamped by the policy; none when there is none),
A6 retries and mesh failures.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_servers import ECHO_INITIAL, ECHO_TRAILING, TestServer, pb, pb_grpc
from prometheus_client import REGISTRY

from meshlib.shim.grpc_proxy import parse_upstream, start_upstream
from meshlib.telemetry import tracing

SERVICE = "orders"
NO_LIMIT = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def set_policy(mesh: Any, doc: dict[str, Any], service: str = SERVICE) -> None:
    rev = mesh.client.put(mesh.layout.policy_key(service), json.dumps(doc))
    deadline = time.monotonic() + 5
    while mesh.snapshot(service).policy_revision < rev:
        assert time.monotonic() < deadline, "policy did not arrive"
        time.sleep(0.01)


# --------------------------------------------------------------------------- a probe server


class Probe:
    """A raw grpcio server (generic handler, any method) that answers with what it saw:
    JSON of the method, its ``time_remaining()`` and the metadata; ``x-probe-abort`` makes it
    fail with that code, details and a ``grpc-status-details-bin`` trailer."""

    DETAILS_BIN = b"\x08\x05\x12\x0bnot here \xe2\x9c\x97"  # any bytes: carried verbatim

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(8),
                                  options=[("grpc.so_reuseport", 0), *NO_LIMIT])
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def service(self, details: Any) -> Any:
        method = details.method

        def behaviour(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
            md = {k: (v.hex() if isinstance(v, bytes) else v)
                  for k, v in context.invocation_metadata()}
            remaining = context.time_remaining()
            seen = {"method": method, "remaining": remaining, "md": md,
                    "requests": [r.decode() if len(r) < 100 else len(r) for r in requests]}
            self.seen.append(seen)
            if "x-probe-abort" in md:
                context.send_initial_metadata((("x-probe-initial", "yes"),))
                if "x-probe-work-ms" in md:  # fail some time after the headers left
                    time.sleep(int(md["x-probe-work-ms"]) / 1000)
                context.set_trailing_metadata((("grpc-status-details-bin", self.DETAILS_BIN),
                                               ("x-probe-trailer", "t1")))
                code = grpc.StatusCode[md.get("x-probe-code", "NOT_FOUND")]
                context.abort(code, md["x-probe-abort"])
            yield json.dumps(seen).encode()

        return grpc.stream_stream_rpc_method_handler(behaviour)

    def stop(self) -> None:
        self.server.stop(0).wait(5)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def servers(mesh: Any) -> Iterator[Callable[..., TestServer]]:
    started: list[TestServer] = []

    def start(server_id: str) -> TestServer:
        s = TestServer(server_id).start()
        started.append(s)
        mesh.register(SERVICE, s.port, protocol="grpc", instance_id=server_id)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def shim(mesh: Any) -> Iterator[Callable[[str], Any]]:
    """Start an upstream listener for a service; returns an app-side grpcio channel to it."""
    handles: list[Any] = []
    channels: list[grpc.Channel] = []

    def start(service: str = SERVICE) -> grpc.Channel:
        handle = start_upstream(mesh, SimpleNamespace(service=service, port=0,
                                                      bind="127.0.0.1"))
        handles.append(handle)
        ch = grpc.insecure_channel(f"127.0.0.1:{handle.port}", options=NO_LIMIT)
        channels.append(ch)
        return ch

    yield start
    for ch in channels:
        ch.close()
    for h in handles:
        h.stop(0.5)


@pytest.fixture
def stub(mesh: Any, servers: Any, shim: Any) -> Any:
    servers("a")
    mesh.wait_for(SERVICE)
    return pb_grpc.TestServiceStub(shim())


@pytest.fixture
def probe(mesh: Any) -> Iterator[Probe]:
    p = Probe()
    mesh.register(SERVICE, p.port, protocol="grpc", instance_id="probe")
    mesh.wait_for(SERVICE)
    yield p
    p.stop()


def raw_unary(channel: grpc.Channel, payload: bytes = b"hi", **kw: Any) -> dict[str, Any]:
    call = channel.unary_unary("/probe.Probe/Look")
    return json.loads(call(payload, **kw))  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the four shapes


def test_unary_large_response(stub: Any) -> None:
    # 5 MiB: above grpcio's 4 MiB default receive limit of the shim's upstream leg
    big = 5 * 1024 * 1024
    resp = stub.UnaryCall(pb.SimpleRequest(response_size=big))
    assert len(resp.payload.body) == big and resp.server_id == "a"
    assert stub.EmptyCall(pb.Empty()) == pb.Empty()


def test_large_request(probe: Probe, shim: Any) -> None:
    # 5 MiB: above grpcio's 4 MiB default receive limit of the shim's listener
    seen = raw_unary(shim(), b"y" * (5 * 1024 * 1024))
    assert seen["requests"] == [5 * 1024 * 1024]


def test_server_streaming(stub: Any) -> None:
    sizes = [31415, 9, 2653, 58979]
    msgs = list(stub.StreamingOutputCall(pb.StreamingOutputCallRequest(response_sizes=sizes)))
    assert [len(m.payload.body) for m in msgs] == sizes


def test_client_streaming(stub: Any) -> None:
    reqs = [pb.StreamingInputCallRequest(payload=pb.Payload(body=b"\0" * n))
            for n in (27182, 8, 1828, 45904)]
    assert stub.StreamingInputCall(iter(reqs)).aggregated_payload_size == 74922


def test_client_streaming_with_no_message(stub: Any) -> None:
    assert stub.StreamingInputCall(iter(())).aggregated_payload_size == 0


def test_ping_pong_waits_for_each_reply(stub: Any) -> None:
    """The app sends one message and waits for its reply before the next: the shim must not
    wait for the end of the request stream to decide the call's shape."""
    q: queue.Queue[Any] = queue.Queue()
    done = object()

    def requests() -> Iterator[Any]:
        while (item := q.get(timeout=10)) is not done:
            yield item

    md = ((ECHO_INITIAL, "pp"), (ECHO_TRAILING, b"\x01\x02"))
    call = stub.FullDuplexCall(requests(), metadata=md, timeout=20)
    out = []
    for size in [31415, 9, 2653, 58979]:
        q.put(pb.StreamingOutputCallRequest(response_sizes=[size]))
        out.append(len(next(call).payload.body))
    q.put(done)
    assert list(call) == []
    assert out == [31415, 9, 2653, 58979]
    assert (ECHO_INITIAL, "pp") in tuple(call.initial_metadata())
    assert (ECHO_TRAILING, b"\x01\x02") in tuple(call.trailing_metadata())


# --------------------------------------------------------------------------- metadata, status


def test_metadata_carried_both_ways(stub: Any) -> None:
    md = ((ECHO_INITIAL, "test_initial_metadata_value"), (ECHO_TRAILING, b"\xab\xab\xab"))
    resp, call = stub.UnaryCall.with_call(pb.SimpleRequest(response_size=314159), metadata=md)
    assert len(resp.payload.body) == 314159 and call.code() == grpc.StatusCode.OK
    assert (ECHO_INITIAL, "test_initial_metadata_value") in tuple(call.initial_metadata())
    assert (ECHO_TRAILING, b"\xab\xab\xab") in tuple(call.trailing_metadata())


def test_request_metadata_reaches_the_server(probe: Probe, shim: Any) -> None:
    seen = raw_unary(shim(), metadata=(("x-custom", "v1"), ("x-blob-bin", b"\x00\xff"),
                                       ("x-mesh-caller", "spoofed")))
    assert seen["method"] == "/probe.Probe/Look" and seen["requests"] == ["hi"]
    assert seen["md"]["x-custom"] == "v1" and seen["md"]["x-blob-bin"] == "00ff"
    assert "x-mesh-caller" not in seen["md"]  # the shim's mesh speaks for the app


def test_status_details_and_trailers_unchanged(probe: Probe, shim: Any) -> None:
    ch = shim()
    for call in (ch.unary_unary("/probe.Probe/Fail"), ch.stream_stream("/probe.Probe/Fail")):
        arg = b"x" if call.__class__.__name__.startswith("_Unary") else iter([b"x", b"y"])
        with pytest.raises(grpc.RpcError) as info:
            result = call(arg, metadata=(("x-probe-abort", "order 7 is gone"),))
            list(result) if not isinstance(result, bytes) else None
        err = info.value
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == "order 7 is gone"
        trailing = tuple(err.trailing_metadata())
        assert ("grpc-status-details-bin", Probe.DETAILS_BIN) in trailing
        assert ("x-probe-trailer", "t1") in trailing
        assert ("x-probe-initial", "yes") in tuple(err.initial_metadata())


def test_status_code_and_message(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryCall(pb.SimpleRequest(action="status", code=2, message="test status message"))
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert info.value.details() == "test status message"


# --------------------------------------------------------------------------- deadlines


def test_no_deadline_when_caller_and_policy_have_none(mesh: Any, probe: Probe,
                                                       shim: Any) -> None:
    set_policy(mesh, {"timeout": None})
    seen = raw_unary(shim())
    assert seen["remaining"] is None or seen["remaining"] > 1e9  # no grpc-timeout sent


def test_caller_deadline_is_passed_on(mesh: Any, probe: Probe, shim: Any) -> None:
    set_policy(mesh, {"timeout": None})
    seen = raw_unary(shim(), timeout=3.0)
    assert 2.0 < seen["remaining"] <= 3.1  # grpc-timeout is rounded up on each leg


def test_caller_deadline_clamped_by_policy(mesh: Any, probe: Probe, shim: Any) -> None:
    set_policy(mesh, {"timeout": "500ms"})
    seen = raw_unary(shim(), timeout=30.0)
    assert 0.0 < seen["remaining"] <= 0.6  # grpc-timeout is rounded up on each leg
    seen = raw_unary(shim())  # no caller deadline: the policy's
    assert 0.0 < seen["remaining"] <= 0.6


def test_deadline_exceeded_reaches_the_caller(stub: Any) -> None:
    stub.EmptyCall(pb.Empty())  # connected on both legs
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryCall(pb.SimpleRequest(action="sleep", sleep_ms=5000), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3.0


# --------------------------------------------------------------------------- retries (A6)


def test_unary_retried_elsewhere_before_headers(mesh: Any, servers: Any, shim: Any) -> None:
    a, _ = servers("a"), servers("b")
    mesh.wait_for(SERVICE, 2)
    a.mode = "unavailable"
    stub = pb_grpc.TestServiceStub(shim())
    resps = [stub.UnaryCall(pb.SimpleRequest()) for _ in range(12)]
    assert {r.server_id for r in resps} == {"b"}
    retried = [r for r in resps if r.previous_attempts]
    assert retried and all(r.previous_attempts == 1 for r in retried)
    assert a.total() == len(retried)


def test_server_stream_retried_before_first_message_only(mesh: Any, servers: Any,
                                                         shim: Any) -> None:
    a, b = servers("a"), servers("b")
    mesh.wait_for(SERVICE, 2)
    a.mode = "unavailable"
    stub = pb_grpc.TestServiceStub(shim())
    for _ in range(4):
        msgs = list(stub.StreamingOutputCall(pb.StreamingOutputCallRequest(response_sizes=[1, 2])))
        assert [m.server_id for m in msgs] == ["b", "b"]
    a.mode = "ok"
    before = a.total() + b.total()
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for m in stub.StreamingOutputCall(pb.StreamingOutputCallRequest(
                response_sizes=[1, 2, 3], action="fail_after_first")):
            got.append(m)
    assert len(got) == 1 and info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert a.total() + b.total() == before + 1


def test_not_retried_after_headers(mesh: Any, shim: Any) -> None:
    """Servers that send response headers, work 50 ms and then fail with UNAVAILABLE: the
    call committed, so it is not retried (A6). (A server that sends headers and fails in the
    same instant can be retried: grpc.aio may report the status before the headers; see
    docs/shim.md, "gRPC upstreams".)"""
    probes = [Probe(), Probe()]
    try:
        for i, p in enumerate(probes):
            mesh.register(SERVICE, p.port, protocol="grpc", instance_id=f"p{i}")
        mesh.wait_for(SERVICE, 2)
        call = shim().unary_unary("/probe.Probe/Get")
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                call(b"x", metadata=(("x-probe-abort", "failed after headers"),
                                     ("x-probe-code", "UNAVAILABLE"), ("x-probe-work-ms", "50")))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ("x-probe-initial", "yes") in tuple(info.value.initial_metadata())
        assert len(probes[0].seen) + len(probes[1].seen) == 3
    finally:
        for p in probes:
            p.stop()


def test_request_streams_never_retried(mesh: Any, shim: Any) -> None:
    """Two instances that fail with UNAVAILABLE once they have read the whole request
    stream (a server that fails *while* the shim still writes can hit grpc#36066, see
    docs/shim.md): one attempt only, its status to the app."""
    probes = [Probe(), Probe()]
    try:
        for i, p in enumerate(probes):
            mesh.register(SERVICE, p.port, protocol="grpc", instance_id=f"p{i}")
        mesh.wait_for(SERVICE, 2)
        call = shim().stream_unary("/probe.Probe/Upload")
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                call(iter([b"1", b"2", b"3"]), metadata=(("x-probe-abort", "down"),
                                                          ("x-probe-code", "UNAVAILABLE")))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == "down"
        seen = probes[0].seen + probes[1].seen
        assert len(seen) == 3 and all(s["requests"] == ["1", "2", "3"] for s in seen)
    finally:
        for p in probes:
            p.stop()


def test_attempts_follow_the_policy(mesh: Any, servers: Any, shim: Any) -> None:
    a, b = servers("a"), servers("b")
    mesh.wait_for(SERVICE, 2)
    set_policy(mesh, {"retries": {"attempts": 2}, "circuit_breaker": {"enabled": False},
                      "outlier_detection": {"enabled": False}})
    a.mode = b.mode = "unavailable"
    stub = pb_grpc.TestServiceStub(shim())
    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryCall(pb.SimpleRequest())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert a.total() == 1 and b.total() == 1


def test_negative_pushback_stops_retries(mesh: Any, servers: Any, shim: Any) -> None:
    a, b = servers("a"), servers("b")
    mesh.wait_for(SERVICE, 2)
    stub = pb_grpc.TestServiceStub(shim())
    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryCall(pb.SimpleRequest(action="pushback", message="-1"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert a.total() + b.total() == 1


# --------------------------------------------------------------------------- mesh failures


def test_no_endpoints_is_unavailable_naming_the_service(shim: Any) -> None:
    stub = pb_grpc.TestServiceStub(shim())
    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryCall(pb.SimpleRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "'orders'" in info.value.details() and "no endpoints" in info.value.details()


def test_fault_abort_uses_policy_status(mesh: Any, stub: Any) -> None:
    set_policy(mesh, {"fault": {"abort": {"percent": 100, "grpc_status": "permission-denied"}}})
    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryCall(pb.SimpleRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_caller_cancel_cancels_upstream(mesh: Any, servers: Any, shim: Any) -> None:
    a = servers("a")
    mesh.wait_for(SERVICE)
    stub = pb_grpc.TestServiceStub(shim())
    call = stub.StreamingOutputCall(pb.StreamingOutputCallRequest(
        response_sizes=[1] * 200, interval_ms=20))
    next(call)
    call.cancel()
    dest = mesh.destination(SERVICE)
    deadline = time.monotonic() + 5
    while dest.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dest.inflight == 0  # the shim's upstream call ended with the app's
    assert a.calls["StreamingOutputCall"] == 1


# --------------------------------------------------------------------------- telemetry


def rpc_call_count(method: str, code: str) -> float:
    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if (sample.name == "rpc_client_call_duration_seconds_count"
                    and sample.labels.get("server_address") == SERVICE
                    and sample.labels.get("rpc_method") == method
                    and sample.labels.get("rpc_response_status_code") == code):
                total += sample.value
    return total


def test_calls_recorded_in_the_library_families(stub: Any) -> None:
    ok, unknown = rpc_call_count("UnaryCall", "OK"), rpc_call_count("UnaryCall", "UNKNOWN")
    stub.UnaryCall(pb.SimpleRequest())
    with pytest.raises(grpc.RpcError):
        stub.UnaryCall(pb.SimpleRequest(action="status", code=2, message="m"))
    # the stream call is recorded when grpc.aio reports it done, just after the app's reply
    deadline = time.monotonic() + 5
    while (rpc_call_count("UnaryCall", "UNKNOWN") < unknown + 1
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert rpc_call_count("UnaryCall", "OK") == ok + 1
    assert rpc_call_count("UnaryCall", "UNKNOWN") == unknown + 1


@pytest.fixture
def provider() -> Iterator[Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    prov = TracerProvider()
    prov.add_span_processor(SimpleSpanProcessor(exporter))
    prov.exporter = exporter  # type: ignore[attr-defined]
    tracing.configure(tracer_provider=prov, propagate_without_sdk=False)
    yield prov
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)


def test_trace_continued_by_the_shim(provider: Any, probe: Probe, shim: Any) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    seen = raw_unary(shim(), metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),
                                       ("tracestate", "vendor=opaque")))
    version, tid, span_id, flags = seen["md"]["traceparent"].split("-")
    assert tid == trace_id and span_id != parent  # same trace, the shim's own span as parent
    assert seen["md"]["tracestate"] == "vendor=opaque"
    # The shim ends its spans on its own loop thread, possibly after the caller has the
    # response: wait for the attempt span the upstream saw to be recorded.
    deadline = time.monotonic() + 10
    while True:
        spans = provider.exporter.get_finished_spans()
        ids = {format(sp.context.span_id, "016x") for sp in spans}
        if span_id in ids or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert span_id in ids  # the attempt span the upstream saw was recorded by the shim
    assert all(format(sp.context.trace_id, "032x") == trace_id for sp in spans)


def test_trace_passes_unchanged_when_tracing_is_off(probe: Probe, shim: Any) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    seen = raw_unary(shim(), metadata=(("traceparent", tp),))
    assert seen["md"]["traceparent"] == tp


# --------------------------------------------------------------------------- config


def test_parse_upstream_errors_name_flag_and_value() -> None:
    assert parse_upstream("orders=15101") == ("orders", 15101)
    for bad, words in [("orders", "SERVICE=PORT"), ("Orders=1", "bad service name"),
                       ("orders=x", "'x' is not a number"), ("orders=70000", "outside")]:
        with pytest.raises(ValueError) as info:
            parse_upstream(bad)
        assert "--upstream" in str(info.value) and repr(bad) in str(info.value)
        assert words in str(info.value)


def test_port_in_use_is_a_clear_error(mesh: Any, shim: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError) as info:
            start_upstream(mesh, SimpleNamespace(service=SERVICE, port=port, bind="127.0.0.1"))
    assert f"127.0.0.1:{port}" in str(info.value) and "orders" in str(info.value)


def test_concurrent_calls_share_the_listener(stub: Any) -> None:
    with futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: stub.UnaryCall(
            pb.SimpleRequest(response_size=i)).payload.body, range(40)))
    assert [len(r) for r in results] == list(range(40))
    assert threading.active_count() < 200


def test_stop_lets_calls_in_flight_finish_then_refuses(mesh: Any, servers: Any) -> None:
    """``handle.stop(grace)`` (the shim's drain): a call in flight completes, new calls are
    refused once the listener is closed."""
    servers("a")
    mesh.wait_for(SERVICE)
    handle = start_upstream(mesh, SimpleNamespace(service=SERVICE, port=0, bind="127.0.0.1"))
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
        stub = pb_grpc.TestServiceStub(ch)
        stub.EmptyCall(pb.Empty())
        with futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(stub.UnaryCall, pb.SimpleRequest(action="sleep", sleep_ms=400),
                               timeout=10)
            dest = mesh.destination(SERVICE)
            deadline = time.monotonic() + 5
            while not dest.inflight and time.monotonic() < deadline:  # it reached the upstream
                time.sleep(0.005)
            assert dest.inflight == 1
            handle.stop(5.0)
            assert slow.result().server_id == "a"
        assert handle.describe()["listening"] is False
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch, pytest.raises(grpc.RpcError) as info:
        pb_grpc.TestServiceStub(ch).EmptyCall(pb.Empty(), timeout=2)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
