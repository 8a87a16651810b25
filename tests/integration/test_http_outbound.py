"""Calls through a mesh client to hosts outside the mesh (``meshlib.http.outbound``).

Real parts: etcd (the ``mesh`` fixture), a real HTTP (and HTTPS) server on loopback that
records the raw header fields it received, the mesh httpx clients (sync and async), and the
OpenTelemetry SDK recording into an in-memory exporter. Checked: a CLIENT span whose context
is what the server received, the ``http.client.request.duration`` series with
``server.address`` = host, no ``x-mesh-*`` field, ``no_propagate`` patterns, the client's own
TLS settings applied to the passthrough transport, and the bounded host label.
"""

from __future__ import annotations

import datetime
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from meshlib.http import outbound
from meshlib.mesh import Mesh
from meshlib.telemetry import semconv as sc
from meshlib.telemetry import tracing

FAMILY = "http_client_request_duration_seconds"


class RawServer:
    """HTTP/1.1 on 127.0.0.1 answering 200; ``received`` holds each request's raw fields."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[list[tuple[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.received.append(list(self.headers.items()))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self._srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._srv.socket = tls.wrap_socket(self._srv.socket, server_side=True)
        self.port = self._srv.server_address[1]
        self._t = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._t.start()

    def fields(self, name: str, i: int = -1) -> list[str]:
        return [v for k, v in self.received[i] if k.lower() == name]

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


@pytest.fixture
def server() -> Iterator[RawServer]:
    s = RawServer()
    yield s
    s.close()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(tracer_provider=provider)
    yield exporter
    tracing.configure(tracer_provider=None)


def count(host: str, status: str = "200") -> float:
    return REGISTRY.get_sample_value(f"{FAMILY}_count", {
        "http_request_method": "GET", "http_response_status_code": status,
        "server_address": host, "error_type": ""}) or 0.0


def test_a_non_mesh_call_is_traced_measured_and_has_no_mesh_fields(
        mesh: Mesh, server: RawServer, spans: InMemorySpanExporter) -> None:
    before = count("127.0.0.1")
    with mesh.http_client() as client:
        r = client.get(f"http://127.0.0.1:{server.port}/x",
                       headers={"x-mesh-timeout": "5S", "x-mesh-caller": "forged"})
    assert r.status_code == 200
    (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert span.attributes[sc.ATTR_SERVER_ADDRESS] == "127.0.0.1"
    assert span.attributes[sc.ATTR_SERVER_PORT] == server.port
    ctx = span.get_span_context()
    assert server.fields("traceparent") == [
        f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"]
    assert [k for k, _ in server.received[-1] if k.lower().startswith("x-mesh-")] == []
    assert count("127.0.0.1") == before + 1


async def test_async_client_the_same(mesh: Mesh, server: RawServer,
                                     spans: InMemorySpanExporter) -> None:
    before = count("127.0.0.1")
    async with mesh.async_http_client() as client:
        r = await client.get(f"http://127.0.0.1:{server.port}/x")
    assert r.status_code == 200
    (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    ctx = span.get_span_context()
    assert server.fields("traceparent") == [f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"]
    assert count("127.0.0.1") == before + 1


def test_no_propagate_pattern_keeps_trace_ids_from_that_host(
        mesh: Mesh, server: RawServer, spans: InMemorySpanExporter) -> None:
    with mesh.http_client(no_propagate=["127.0.0.*"]) as client:
        r = client.get(f"http://127.0.0.1:{server.port}/x",
                       headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
                                "baggage": "user=42"})
    assert r.status_code == 200
    names = {k.lower() for k, _ in server.received[-1]}
    assert not names & {"traceparent", "tracestate", "baggage"}
    # the call is still recorded
    assert [s.kind for s in spans.get_finished_spans()] == [SpanKind.CLIENT]


def test_no_propagate_env_and_bad_pattern(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLIB_NO_PROPAGATE", "*.partner.com, api.stripe.com")
    with mesh.http_client() as client:
        policy = client._transport._outbound.policy  # type: ignore[attr-defined]
    assert not policy.allows("api.partner.com") and policy.allows("billing.internal")
    with pytest.raises(ValueError, match=r"no_propagate\[0\]='https://x.com/': not a host"):
        mesh.http_client(no_propagate=["https://x.com/"])


def _self_signed(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, cert_path


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_the_clients_own_tls_settings_apply_to_non_mesh_hosts(
        mesh: Mesh, tmp_path: Path, asynchronous: bool) -> None:
    tls, ca = _self_signed(tmp_path)
    srv = RawServer(tls)
    url = f"https://127.0.0.1:{srv.port}/x"
    try:
        verify: Any = ssl.create_default_context(cafile=str(ca))
        if asynchronous:
            async with mesh.async_http_client() as plain:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await plain.get(url)
            async with mesh.async_http_client(verify=verify) as client:
                assert (await client.get(url)).status_code == 200
        else:
            with mesh.http_client() as plain:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    plain.get(url)
            with mesh.http_client(verify=verify) as client:
                assert client.get(url).status_code == 200
    finally:
        srv.close()


def test_a_proxy_applies_to_non_mesh_hosts_only(mesh: Mesh, server: RawServer) -> None:
    """httpx would mount ``proxy`` for every URL (mesh calls too); the mesh hands it to the
    passthrough transport. The "proxy" here is the raw server, which answers anything."""
    with mesh.http_client(proxy=f"http://127.0.0.1:{server.port}") as client:
        assert client._mounts == {}
        r = client.get("http://example.invalid/through-proxy")
    assert r.status_code == 200
    assert ("Host", "example.invalid") in server.received[-1]


def test_host_label_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbound, "_labels", {})
    monkeypatch.setattr(outbound, "MAX_OUTBOUND_HOSTS", 3)
    got = [outbound.outbound_label(f"h{i}.example") for i in range(5)]
    assert got == ["h0.example", "h1.example", "h2.example", sc.OTHER, sc.OTHER]
    assert outbound.outbound_label("h1.example") == "h1.example"


def test_baggage_the_app_set_goes_to_non_mesh_hosts(
        mesh: Mesh, server: RawServer, spans: InMemorySpanExporter) -> None:
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with mesh.http_client() as client:
            assert client.get(f"http://127.0.0.1:{server.port}/x").status_code == 200
        with mesh.http_client(no_propagate="127.0.0.1") as client:
            assert client.get(f"http://127.0.0.1:{server.port}/y").status_code == 200
    finally:
        otel_context.detach(token)
    assert server.fields("baggage", -2) == ["tenant=acme"]
    assert server.fields("baggage", -1) == []
