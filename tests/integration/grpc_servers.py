"""Real gRPC test servers on loopback for the mesh channel tests (and the gRPC benchmark).

``TestServer`` runs the ``meshtest.TestService`` (tests/grpc_proto/meshtest.proto, modelled on
the gRPC interop ``TestService``) in a grpcio thread-pool server on a free port, with a
``grpc.health.v1`` Check handler. Behaviour is steered per request (``action``) or per server
(``mode``: "ok", "unavailable" before any header, "unavailable_after_headers"), and every
call is counted so tests can tell which server saw what.

Interop conventions kept: metadata ``x-grpc-test-echo-initial`` is echoed as initial
metadata and ``x-grpc-test-echo-trailing-bin`` as trailing metadata.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from typing import Any

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from grpc_proto import meshtest_pb2 as pb  # noqa: E402
from grpc_proto import meshtest_pb2_grpc as pb_grpc  # noqa: E402

from meshlib.grpc.health import NOT_SERVING, SERVING, add_health_servicer  # noqa: E402

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"

__all__ = ["ECHO_INITIAL", "ECHO_TRAILING", "NOT_SERVING", "SERVING", "TestServer", "pb",
           "pb_grpc"]


def _echo(context: Any) -> None:
    md = dict(context.invocation_metadata())
    if ECHO_INITIAL in md:
        context.send_initial_metadata(((ECHO_INITIAL, md[ECHO_INITIAL]),))
    if ECHO_TRAILING in md:
        context.set_trailing_metadata(((ECHO_TRAILING, md[ECHO_TRAILING]),))


class _Servicer(pb_grpc.TestServiceServicer):
    def __init__(self, server: TestServer) -> None:
        self.s = server

    def _enter(self, method: str, context: Any) -> None:
        s = self.s
        with s.lock:
            s.calls[method] += 1
            prev = dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts")
            if prev is not None:
                s.retried += 1
        if s.mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{s.server_id} is unavailable")
        if s.mode == "unavailable_after_headers":
            context.send_initial_metadata((("x-server", s.server_id),))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{s.server_id} failed after headers")

    def EmptyCall(self, request: Any, context: Any) -> Any:
        self._enter("EmptyCall", context)
        return pb.Empty()

    def UnaryCall(self, request: Any, context: Any) -> Any:
        self._enter("UnaryCall", context)
        action = request.action
        if action == "status":
            code = next(c for c in grpc.StatusCode if c.value[0] == request.code)
            context.abort(code, request.message)
        if action == "sleep":
            end = time.monotonic() + request.sleep_ms / 1000.0
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.005)
        if action == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail")
        if action == "unavailable_after_headers":
            context.send_initial_metadata((("x-server", self.s.server_id),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail after headers")
        if action == "pushback":
            context.set_trailing_metadata((("grpc-retry-pushback-ms", request.message),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "pushback")
        _echo(context)
        prev = dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts", "0")
        return pb.SimpleResponse(payload=pb.Payload(body=b"\0" * request.response_size),
                                 server_id=self.s.server_id, previous_attempts=int(prev))

    def StreamingOutputCall(self, request: Any, context: Any) -> Any:
        self._enter("StreamingOutputCall", context)
        for i, size in enumerate(request.response_sizes):
            if i and request.interval_ms:
                time.sleep(request.interval_ms / 1000.0)
            yield pb.StreamingOutputCallResponse(payload=pb.Payload(body=b"\0" * size),
                                                 server_id=self.s.server_id)
            if request.action == "fail_after_first":
                context.abort(grpc.StatusCode.UNAVAILABLE, "failed after the first message")

    def StreamingInputCall(self, request_iterator: Any, context: Any) -> Any:
        self._enter("StreamingInputCall", context)
        total = sum(len(r.payload.body) for r in request_iterator)
        return pb.StreamingInputCallResponse(aggregated_payload_size=total,
                                             server_id=self.s.server_id)

    def FullDuplexCall(self, request_iterator: Any, context: Any) -> Any:
        self._enter("FullDuplexCall", context)
        _echo(context)
        for req in request_iterator:
            if req.action == "status":
                context.abort(grpc.StatusCode.UNKNOWN, "test status message")
            for size in req.response_sizes:
                yield pb.StreamingOutputCallResponse(payload=pb.Payload(body=b"\0" * size),
                                                     server_id=self.s.server_id)


class TestServer:
    """A ``meshtest.TestService`` server on ``127.0.0.1:<free port>``."""

    __test__ = False  # not a pytest test class

    def __init__(self, server_id: str, *, workers: int = 16) -> None:
        self.server_id = server_id
        self.mode = "ok"
        self.health = SERVING
        self.calls: Counter[str] = Counter()
        self.retried = 0
        self.lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                   options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_TestServiceServicer_to_server(_Servicer(self), self._server)
        add_health_servicer(self._server, lambda _svc: self.health)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.running = False

    def start(self) -> TestServer:
        self._server.start()
        self.running = True
        return self

    def stop(self, grace: float | None = 0) -> None:
        if self.running:
            self.running = False
            self._server.stop(grace).wait(5)

    def total(self) -> int:
        with self.lock:
            return sum(self.calls.values())

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(server_id: str = "bench") -> None:  # pragma: no cover - bench helper
    """Run one server and print its port (used by bench/grpc_overhead.py)."""
    s = TestServer(server_id).start()
    print(s.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        s.stop()


def spawn(server_id: str) -> tuple[subprocess.Popen[str], int]:
    """Run a ``TestServer`` in a child process (to be SIGKILLed); returns it and its port."""
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    proc = subprocess.Popen([sys.executable, __file__, server_id], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


if __name__ == "__main__":  # pragma: no cover
    serve_forever(sys.argv[1] if len(sys.argv) > 1 else "bench")
