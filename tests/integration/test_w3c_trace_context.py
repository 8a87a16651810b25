"""W3C Trace Context, request-header rules (https://www.w3.org/TR/trace-context/ section 3),
through a real server with the middleware and a real client, with and without an SDK.

Real parts: etcd, an ASGI app behind ``MeshASGIMiddleware`` served by uvicorn in a thread
(the "middle" service), and a downstream HTTP server recording the raw fields it receives.
The test client (httpx) sends each case's header fields, as many fields as the case has, to
the middle service, whose handler calls the downstream through ``mesh.async_http_client()``,
either as the mesh service ``w3c-down`` or at its plain address (a non-mesh call). The test
checks what the downstream received.

* SDK mode (an OpenTelemetry SDK provider): a valid inbound ``traceparent`` continues its
  trace (same trace id, a new parent id, version ``00``, the sampled flag kept) and
  ``tracestate`` is carried over; an invalid one starts a new trace and its ``tracestate``
  is ignored.
* No-SDK mode (``propagate_without_sdk=True``): a valid ``traceparent`` and its
  ``tracestate`` go out byte for byte (the parent is not changed, so tracestate must not be
  modified); an invalid one is not forwarded, nor its ``tracestate``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from test_http_outbound import RawServer
from test_trace_chain import UvicornThread

from meshlib.mesh import Mesh
from meshlib.server import MeshASGIMiddleware
from meshlib.telemetry import tracing
from meshlib.telemetry.metrics import MeshMetrics

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
TP = f"00-{TID}-{PID}-01"
DOWN = "w3c-down"

# (id, inbound fields, valid?) -- one row per rule of section 3.2/3.3 and 3.2.4 (versioning)
CASES: list[tuple[str, list[tuple[str, str]], bool]] = [
    ("valid-00", [("traceparent", TP), ("tracestate", "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")], True),
    ("field-name-any-case", [("TraceParent", TP), ("TraceState", "rojo=1")], True),
    ("no-tracestate", [("traceparent", TP)], True),
    ("unsampled-flags", [("traceparent", f"00-{TID}-{PID}-00"), ("tracestate", "a=1")], True),
    ("version-ff-invalid", [("traceparent", f"ff-{TID}-{PID}-01"), ("tracestate", "a=1")], False),
    ("version-not-hex", [("traceparent", f"0g-{TID}-{PID}-01")], False),
    ("uppercase-hex-invalid", [("traceparent", f"00-{TID.upper()}-{PID}-01")], False),
    ("trace-id-zero-invalid", [("traceparent", f"00-{'0' * 32}-{PID}-01"), ("tracestate", "a=1")], False),
    ("parent-id-zero-invalid", [("traceparent", f"00-{TID}-{'0' * 16}-01")], False),
    ("trace-id-short-invalid", [("traceparent", f"00-{TID[:-1]}-{PID}-01")], False),
    ("flags-not-hex", [("traceparent", f"00-{TID}-{PID}-0g")], False),
    ("version-00-extra-invalid", [("traceparent", f"{TP}-extra")], False),
    ("future-version-extra-valid", [("traceparent", f"cc-{TID}-{PID}-01-what-the-future-will-be-like"),
                                    ("tracestate", "a=1")], True),
    ("future-version-no-dash-invalid", [("traceparent", f"cc-{TID}-{PID}-01x")], False),
    ("future-version-short-invalid", [("traceparent", f"cc-{TID}-{PID}-0")], False),
    ("two-traceparent-fields-invalid", [("traceparent", TP), ("traceparent", TP), ("tracestate", "a=1")], False),
    ("tracestate-two-fields-combined", [("traceparent", TP), ("tracestate", "a=1"), ("tracestate", "b=2")], True),
    ("tracestate-without-traceparent", [("tracestate", "a=1")], False),
    ("tracestate-otel-rejects-duplicate-keys", [("traceparent", TP), ("tracestate", "a=1,a=2")], True),
]


class Middle:
    """``w3c-mid``: an ASGI app behind the middleware that calls the downstream once."""

    def __init__(self, mesh: Mesh, down: RawServer) -> None:
        self.mesh = mesh
        self.down = down
        self.client: httpx.AsyncClient | None = None

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if self.client is None:  # on uvicorn's loop
                self.client = mesh.async_http_client()
            target = scope["path"].strip("/")
            url = (f"http://{DOWN}/x" if target == "mesh"
                   else f"http://127.0.0.1:{down.port}/x")
            r = await self.client.get(url)
            await send({"type": "http.response.start", "status": r.status_code,
                        "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})

        self.http = UvicornThread(MeshASGIMiddleware(
            app, mesh, service="w3c-mid", metrics=MeshMetrics(CollectorRegistry())))
        self.http.start()


@pytest.fixture(scope="module")
def middle(etcd_server: Any) -> Iterator[Middle]:
    prefix = f"/meshlib-test/{uuid.uuid4().hex}/v1"
    down = RawServer()
    with Mesh(etcd_server.endpoint, prefix=prefix, service="w3c-mid",
              handle_sigterm=False) as mesh:
        mesh.register(DOWN, down.port)
        mesh.wait_for(DOWN)
        m = Middle(mesh, down)
        yield m
        m.http.stop()
    down.close()
    tracing.configure(tracer_provider=None, propagate_without_sdk=False)


def _send(middle: Middle, fields: list[tuple[str, str]], target: str) -> list[tuple[str, str]]:
    before = len(middle.down.received)
    r = httpx.get(f"http://127.0.0.1:{middle.http.port}/{target}", headers=fields)
    assert r.status_code == 200
    assert len(middle.down.received) == before + 1
    return middle.down.received[-1]


def _values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in fields if k.lower() == name]


def _members(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


@pytest.mark.parametrize("target", ["mesh", "plain"])
@pytest.mark.parametrize(("case", "fields", "valid"), CASES, ids=[c[0] for c in CASES])
def test_without_sdk_forwards_valid_context_byte_for_byte(
        middle: Middle, target: str, case: str, fields: list[tuple[str, str]],
        valid: bool) -> None:
    tracing.configure(tracer_provider=None, propagate_without_sdk=True)
    got = _send(middle, fields, target)
    if not valid:
        assert _values(got, "traceparent") == []
        assert _values(got, "tracestate") == []
        return
    assert _values(got, "traceparent") == _values(fields, "traceparent")
    sent_state = _values(fields, "tracestate")
    assert _values(got, "tracestate") == ([", ".join(sent_state)] if sent_state else [])


@pytest.mark.parametrize("target", ["mesh", "plain"])
@pytest.mark.parametrize(("case", "fields", "valid"), CASES, ids=[c[0] for c in CASES])
def test_with_sdk_continues_valid_context_and_restarts_on_invalid(
        middle: Middle, target: str, case: str, fields: list[tuple[str, str]],
        valid: bool) -> None:
    tracing.configure(tracer_provider=TracerProvider(), propagate_without_sdk=False)
    got = _send(middle, fields, target)
    (parent,) = _values(got, "traceparent")
    version, trace_id, parent_id, flags = parent.split("-")
    assert version == "00" and len(trace_id) == 32 and len(parent_id) == 16
    state = _values(got, "tracestate")
    if not valid:
        assert trace_id != TID  # a new trace
        assert state == []  # the invalid traceparent's tracestate is ignored
        return
    inbound = _values(fields, "traceparent")[0]
    assert trace_id == TID
    assert parent_id != PID  # our own CLIENT span
    assert int(flags, 16) & 1 == int(inbound.split("-")[3], 16) & 1  # sampled kept
    sent = [m for v in _values(fields, "tracestate") for m in _members(v)]
    if case == "tracestate-otel-rejects-duplicate-keys":
        assert state == []  # OpenTelemetry drops the whole header (docs/tracing.md)
    elif sent:
        assert [_members(v) for v in state] == [sent]
    else:
        assert state == []
