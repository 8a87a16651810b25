"""Pure parts of the shim's gRPC forwarding (meshlib.shim.grpc_forward): what metadata is
carried, how the caller's deadline is read, and the listener's option checks."""

from __future__ import annotations

import pytest

from meshlib.core.deadline import MAX_TIMEOUT_SECONDS
from meshlib.shim.grpc_forward import (
    CallForwarder,
    caller_timeout,
    forwarded_metadata,
    response_metadata,
)
from meshlib.shim.grpc_proxy import parse_upstream


def test_request_metadata_keeps_the_apps_and_drops_grpcs_own() -> None:
    md = [("user-agent", "grpc-node-js/1.14"), ("grpc-timeout", "1S"),
          ("grpc-accept-encoding", "gzip"), ("te", "trailers"), ("content-type", "application/grpc"),
          ("x-mesh-caller", "spoofed"), ("grpc-previous-rpc-attempts", "1"),
          ("x-tenant", "t1"), ("x-blob-bin", b"\x00\x01"), ("authorization", "Bearer x")]
    out, traced = forwarded_metadata(md)
    assert out == [("x-tenant", "t1"), ("x-blob-bin", b"\x00\x01"), ("authorization", "Bearer x")]
    assert traced is False


def test_request_metadata_notices_a_trace_context() -> None:
    out, traced = forwarded_metadata([("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")])
    assert traced is True and out[0][0] == "traceparent"
    assert forwarded_metadata(None) == ([], False)


def test_response_metadata_keeps_status_details_and_pushback() -> None:
    md = [("x-server", "a"), ("grpc-status-details-bin", b"\x08\x05"),
          ("grpc-retry-pushback-ms", "10"), ("grpc-encoding", "gzip"), ("content-type", "x")]
    assert response_metadata(md) == [("x-server", "a"), ("grpc-status-details-bin", b"\x08\x05"),
                                     ("grpc-retry-pushback-ms", "10")]
    assert response_metadata(None) == []


@pytest.mark.parametrize(("remaining", "expected"), [
    (None, None),                           # grpc.aio: the caller set no deadline
    (MAX_TIMEOUT_SECONDS, None),            # sync grpcio's "no deadline" (grpc#26236)
    (9.2e18, None),
    (2.5, 2.5),
    (0.0, 0.0),
    (-0.3, 0.0),                            # already passed: the plan fails it at once
])
def test_caller_timeout(remaining: float | None, expected: float | None) -> None:
    assert caller_timeout(remaining) == expected


def test_forwarder_refuses_a_negative_window() -> None:
    with pytest.raises(ValueError, match="unary_window: must be >= 0 seconds, got -1"):
        CallForwarder(object(), unary_window=-1)


def test_parse_upstream_accepts_spaces_and_port_zero() -> None:
    assert parse_upstream(" orders = 0 ") == ("orders", 0)
