"""``meshlib.grpc.driver.CallDriver``, driven by hand as the five gRPC shells drive it.

Pure logic: a ``DestinationState`` over a fixed snapshot with a fake clock (as the call-plan
tables), the real recorders on a private registry, and a stand-in for the multicallable
that owns the driver (its endpoint-callable cache and telemetry). No sockets, no grpcio
channels: what the shells add (the waiting) is tested by the integration tests against real
servers.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from plan_fakes import Clock
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.config.policy import parse_policy_dict
from meshlib.core.call import Attempt, CallEnd, Sleep
from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.core.outcome import classify_grpc
from meshlib.grpc.attempt import RpcTelemetry
from meshlib.grpc.driver import CallDriver
from meshlib.grpc.errors import MeshRpcError
from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.recorders import RpcClientRecorder

SVC = "orders"
METHOD = "/shop.Orders/Get"
CALLS = "rpc_client_call_duration_seconds_count"
ATTEMPTS = "meshlib_client_attempt_duration_seconds_count"
POLICY = {
    "retries": {"attempts": 3, "backoff": {"base": "1ms", "max": "2ms"}},
    "outlier_detection": {"enabled": False},
}


class Unavailable(grpc.RpcError):
    """What grpcio raises for an attempt that failed before any response header."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()


class Harness:
    """A multicallable's view for the driver: destination, telemetry, endpoint callables."""

    def __init__(self, endpoints: int = 2, policy: dict[str, Any] | None = None) -> None:
        eps = tuple(Endpoint(SVC, f"i{i}", "127.0.0.1", 9000 + i, key=f"/svc/{SVC}/i{i}")
                    for i in range(endpoints))
        snap = ServiceSnapshot(SVC, eps, parse_policy_dict(policy or POLICY, "test"))
        self.clock = Clock()
        self.dest = DestinationState(SVC, lambda: snap, now=self.clock, rng=random.Random(3))
        self.reg = CollectorRegistry()
        recorder = RpcClientRecorder.for_service(SVC, metrics=MeshMetrics(self.reg))
        self.mc_error: BaseException | None = None
        self.owner = SimpleNamespace(
            _dest=self.dest, _method=METHOD, _replayable=True, _observer=recorder,
            _tel=RpcTelemetry(recorder, SVC, METHOD), _extra=(("x-mesh-caller", "web"),),
            _mcs={}, _gen=0, _pool=SimpleNamespace(generation=0), _mc=self._mc,
            _service=SVC,
        )

    def _mc(self, ep: Endpoint) -> Any:
        if self.mc_error is not None:
            raise self.mc_error
        return f"callable of {ep.instance_id}"

    def calls(self, code: str, error_type: str = "") -> float:
        return self.reg.get_sample_value(CALLS, {
            "rpc_system": "grpc", "rpc_service": "shop.Orders", "rpc_method": "Get",
            "server_address": SVC, "rpc_response_status_code": code,
            "error_type": error_type}) or 0.0

    def attempts(self, attempt: str, outcome: str) -> float:
        return self.reg.get_sample_value(ATTEMPTS, {
            "server_address": SVC, "attempt": attempt, "outcome": outcome}) or 0.0

    def all_calls(self) -> float:
        return sum(s.value for m in self.reg.collect() for s in m.samples if s.name == CALLS)


def test_retry_then_response_runs_the_plan_and_records_each_attempt() -> None:
    h = Harness()
    md = (("tenant", "acme"),)
    drv = CallDriver(h.owner, md, None)  # type: ignore[arg-type]
    action = drv.advance(None)
    assert isinstance(action, Attempt) and action.number == 1
    mc, md1 = drv.start_attempt(action)
    assert mc.startswith("callable of ")
    assert md1 == (("tenant", "acme"), ("x-mesh-caller", "web"))  # nothing to inject
    assert h.dest.inflight == 1
    action = drv.failed(Unavailable())
    assert isinstance(action, Sleep)
    action = drv.advance(None)
    assert isinstance(action, Attempt) and action.number == 2
    _, md2 = drv.start_attempt(action)
    assert ("grpc-previous-rpc-attempts", "1") in md2
    end = drv.ok()
    assert isinstance(end, CallEnd) and end.attempts == 2
    assert drv.finish(end) is None
    assert h.dest.inflight == 0
    assert h.calls("OK") == 1 and h.all_calls() == 1
    assert h.attempts("1", classify_grpc("UNAVAILABLE").value) == 1
    assert h.attempts("2", "success") == 1


def test_abort_closes_the_plan_once_and_records_the_call_as_interrupted() -> None:
    h = Harness()
    drv = CallDriver(h.owner, None, None)  # type: ignore[arg-type]
    drv.start_attempt(drv.advance(None))  # type: ignore[arg-type]
    assert h.dest.inflight == 1
    assert drv.abort(KeyboardInterrupt()) is True
    assert h.dest.inflight == 0  # the concurrency slot is free again
    assert h.calls("CANCELLED", "KeyboardInterrupt") == 1
    assert h.attempts("1", "local") == 1
    assert drv.abort(None) is False  # once only
    assert drv.settle_stream(grpc.StatusCode.OK, None) is False
    assert h.all_calls() == 1


def test_cancel_after_the_deadline_is_recorded_as_deadline_exceeded() -> None:
    h = Harness()
    drv = CallDriver(h.owner, None, 1.0)  # type: ignore[arg-type]
    drv.start_attempt(drv.advance(None))  # type: ignore[arg-type]
    h.clock.advance(1.5)
    assert drv.abort(asyncio.CancelledError()) is True
    assert h.calls("DEADLINE_EXCEEDED", "deadline_exceeded") == 1


def test_cancel_before_the_deadline_is_recorded_as_cancelled() -> None:
    h = Harness()
    drv = CallDriver(h.owner, None, 1.0)  # type: ignore[arg-type]
    drv.start_attempt(drv.advance(None))  # type: ignore[arg-type]
    assert drv.abort(asyncio.CancelledError()) is True
    assert h.calls("CANCELLED", "CANCELLED") == 1


def test_endpoint_channel_failure_aborts_the_call_before_it_propagates() -> None:
    h = Harness()
    h.mc_error = RuntimeError("gRPC channel to service 'orders' is closed")
    drv = CallDriver(h.owner, None, None)  # type: ignore[arg-type]
    action = drv.advance(None)
    with pytest.raises(RuntimeError, match="is closed"):
        drv.start_attempt(action)  # type: ignore[arg-type]
    assert h.dest.inflight == 0
    assert h.calls("CANCELLED", "RuntimeError") == 1
    assert h.all_calls() == 1
    assert drv.abort(RuntimeError()) is False  # the shell's own abort is a no-op


def test_mesh_failure_gives_the_error_and_records_its_reason() -> None:
    h = Harness(endpoints=0)
    drv = CallDriver(h.owner, None, None)  # type: ignore[arg-type]
    end = drv.advance(None)
    assert isinstance(end, CallEnd)
    exc = drv.finish(end)
    assert isinstance(exc, MeshRpcError)
    assert exc.reason == "no_endpoints" and exc.code() == grpc.StatusCode.UNAVAILABLE
    assert h.calls("UNAVAILABLE", "no_endpoints") == 1
    assert h.reg.get_sample_value("meshlib_client_no_endpoints_total",
                                  {"server_address": SVC}) == 1


def test_committed_stream_is_settled_once_with_its_status() -> None:
    h = Harness()
    drv = CallDriver(h.owner, None, None)  # type: ignore[arg-type]
    drv.start_attempt(drv.advance(None))  # type: ignore[arg-type]
    assert drv.settle_stream(grpc.StatusCode.NOT_FOUND, None) is True
    assert h.dest.inflight == 0
    assert h.calls("NOT_FOUND", "NOT_FOUND") == 1
    assert h.attempts("1", "success") == 0 and h.all_calls() == 1
    assert drv.settle_stream(grpc.StatusCode.OK, None) is False
    assert drv.abort(None) is False
    assert h.all_calls() == 1


def test_grpc_drivers_import_no_http_stack() -> None:
    """The gRPC channels depend on core, context and telemetry only: importing them loads
    neither httpx nor meshlib.http (``current_deadline`` comes from ``meshlib.context``)."""
    root = os.path.dirname(os.path.dirname(meshlib.__file__))
    code = ("import sys, meshlib.grpc.channel, meshlib.grpc.aio; "
            "print(sorted(m for m in sys.modules if m == 'httpx' or m.startswith('meshlib.http')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "[]"
