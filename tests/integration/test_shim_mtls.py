"""The shim speaks mesh mTLS on both sides (``--identity on``): a clear-text client calls
``gateway``'s shim, which connects with TLS to ``backend``'s shim inbound port, which hands the
request to the app with the verified caller. Real etcd, a real signer (certificates issued
through etcd by ``meshlib.identity.signer`` from a test CA), two real shim processes, real
sockets. Also: strict refuses clear text at the inbound port with a readable reason, rotation
under traffic fails no call, and the shim's gRPC upstream reaches a TLS gRPC server."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_servers import pb, pb_grpc
from http_servers import Upstream, set_policy, wait_endpoints
from shim_harness import ShimProcess, exchange, split_response

from meshlib.discovery.etcd_client import EtcdClient
from meshlib.identity import StaticIdentitySource
from meshlib.identity.authority import Authority
from meshlib.identity.signer import Signer
from meshlib.identity.testing import TestCA
from meshlib.mesh import Mesh
from meshlib.server import MeshServerInterceptor
from meshlib.server.tls import grpc_server_credentials
from meshlib.tls import client_context

GATEWAY = "spiffe://meshlib.local/svc/gateway"


def wait_until(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA()


@pytest.fixture
def signer(etcd_server: Any, etcd_prefix: str, ca: TestCA, tmp_path: Path) -> Iterator[Signer]:
    authority = Authority.load(ca.write_dir(tmp_path / "ca"))
    client = EtcdClient(etcd_server.endpoint, timeout=3)
    s = Signer(client, authority, prefix=etcd_prefix, lifetime=dt.timedelta(seconds=6))
    assert s.wait_active(10)
    yield s
    s.close()
    client.close()


@pytest.fixture
def app() -> Iterator[Upstream]:
    up = Upstream("app")
    yield up
    up.kill()


def backend_shim(etcd_server: Any, prefix: str, name: str, app_port: int,
                 *extra: str) -> ShimProcess:
    return ShimProcess(etcd_server.endpoint, prefix, "--service", name, "--app-port",
                       str(app_port), "--health", "tcp", "--identity", "on", *extra,
                       wait="/ready", free_ports=("--inbound-port",))


def gateway_shim(etcd_server: Any, prefix: str, *extra: str,
                 free_ports: tuple[str, ...] = ()) -> ShimProcess:
    return ShimProcess(etcd_server.endpoint, prefix, "--service", "gateway", "--identity", "on",
                       *extra, wait="/ready", free_ports=free_ports)


def tls_probe(port: int, ca: TestCA, service: str = "probe") -> bytes:
    """The DER certificate the inbound port presents to a mesh TLS client (``service``)."""
    ctx = client_context(ca.issue(service))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_clear_text_app_to_shim_mtls_to_shim_to_app(etcd_server, mesh: Mesh, signer: Signer,
                                                    ca: TestCA, app: Upstream) -> None:
    name = f"be-{uuid.uuid4().hex[:6]}"
    with backend_shim(etcd_server, mesh.layout.prefix, name, app.port) as back, \
            gateway_shim(etcd_server, mesh.layout.prefix) as gw:
        inbound = back.ports["--inbound-port"]
        wait_endpoints(mesh, name, 1)
        (ep,) = mesh.snapshot(name).endpoints
        assert ep.port == inbound and ep.tls  # registered with "tls": true
        # the inbound port presents the backend's mesh certificate
        der = tls_probe(inbound, ca)
        assert f"spiffe://meshlib.local/svc/{name}".encode() in der
        with httpx.Client(base_url=f"http://127.0.0.1:{gw.port}", headers={"host": name},
                          trust_env=False, timeout=10) as client:
            # permissive (default): the gateway connects with TLS because the record says so
            r = client.get("/hello", headers={"x-mesh-caller": "forged",
                                              "x-forwarded-client-cert": "URI=spiffe://x/y"})
            assert r.status_code == 200, r.text
            got = app.received[-1]
            assert got.headers["x-mesh-caller"] == "gateway"
            assert got.headers["x-forwarded-client-cert"] == f"URI={GATEWAY}"

            # strict: a clear-text caller at the inbound port is refused with the reason,
            # whatever x-mesh-caller it claims; the gateway's mTLS calls go on
            set_policy(mesh, name, {"mtls": {"mode": "strict"}})
            bare = (f"GET /x HTTP/1.1\r\nHost: {name}\r\nx-mesh-caller: gateway\r\n"
                    "Connection: close\r\n\r\n").encode()

            def refused() -> bool:
                return split_response(exchange(inbound, bare))[0] == 403

            wait_until(refused, what="strict applied by the backend's shim")
            status, _headers, body = split_response(exchange(inbound, bare))
            assert status == 403 and b"mtls_required" in body
            assert b"mesh certificate required" in body and b"strict" in body
            count = app.count
            r = client.post("/echo", content=b"x" * 200_000)
            assert r.status_code == 200, r.text
            assert app.received[-1].body == b"x" * 200_000
            assert app.received[-1].headers["x-mesh-caller"] == "gateway"
            assert app.count == count + 1  # refused clear-text requests never reached the app

            # the access policy judges the verified identity
            set_policy(mesh, name, {"mtls": {"mode": "strict"},
                                    "access": {"allow": ["someone-else"]}})
            wait_until(lambda: client.get("/secret").status_code == 403,
                       what="access policy applied")
            r = client.get("/secret")
            assert r.json()["error"] == "access_denied" and r.json()["caller"] == "gateway"
        text = back.admin("/metrics")[1].decode()
        assert any(ln.startswith("meshlib_mtls_refused_total") and 'side="server"' in ln
                   and 'reason="no_certificate"' in ln for ln in text.splitlines()), text


def test_strict_destination_without_identity_is_refused_by_the_caller_shim(
        etcd_server, mesh: Mesh, signer: Signer, app: Upstream) -> None:
    name = f"be-{uuid.uuid4().hex[:6]}"
    with backend_shim(etcd_server, mesh.layout.prefix, name, app.port) as back, \
            ShimProcess(etcd_server.endpoint, mesh.layout.prefix, "--service", "plain",
                        wait="/ready") as plain:
        del back
        wait_endpoints(mesh, name, 1)
        set_policy(mesh, name, {"mtls": {"mode": "strict"}, "retries": {"attempts": 1}})
        with httpx.Client(base_url=f"http://127.0.0.1:{plain.port}", headers={"host": name},
                          trust_env=False, timeout=10) as client:
            wait_until(lambda: client.get("/").status_code >= 500, what="strict applied")
            r = client.get("/")
            assert r.status_code == 503 and r.headers["x-mesh-error"] == "ConnectError"
            assert "no mesh identity" in r.text and "strict" in r.text, r.text
        assert app.count == 0


def test_rotation_under_traffic_fails_no_call(etcd_server, mesh: Mesh, signer: Signer,
                                              ca: TestCA, app: Upstream) -> None:
    """6 s certificates (renewed every ~3 s): traffic on kept-alive connections and on new
    connections (0.05 s upstream idle timeout, a pause between calls) runs until both shims
    have rotated twice; no call fails."""
    name = f"be-{uuid.uuid4().hex[:6]}"
    with backend_shim(etcd_server, mesh.layout.prefix, name, app.port) as back, \
            gateway_shim(etcd_server, mesh.layout.prefix, "--upstream-idle-timeout",
                         "0.05") as gw:
        inbound = back.ports["--inbound-port"]
        wait_endpoints(mesh, name, 1)
        set_policy(mesh, name, {"mtls": {"mode": "strict"}, "retries": {"attempts": 1}})
        stop = threading.Event()
        failures: list[str] = []
        counts = [0, 0]

        def loop(slot: int, pause: float) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{gw.port}", headers={"host": name},
                              trust_env=False, timeout=10) as client:
                while not stop.is_set():
                    try:
                        r = client.get("/r")
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text}")
                        counts[slot] += 1
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    if pause:
                        time.sleep(pause)

        def gateway_expiry() -> float:
            for ln in gw.admin("/metrics")[1].decode().splitlines():
                if ln.startswith("meshlib_identity_cert_expiry_seconds"):
                    return float(ln.split()[-1])
            raise AssertionError("no meshlib_identity_cert_expiry_seconds on the gateway")

        threads = [threading.Thread(target=loop, args=(0, 0.0)),
                   threading.Thread(target=loop, args=(1, 0.1))]
        for t in threads:
            t.start()
        try:
            server_certs = {tls_probe(inbound, ca)}
            gateway_rotations = 0
            last = gateway_expiry()
            deadline = time.monotonic() + 30
            while len(server_certs) < 3 or gateway_rotations < 2:
                assert time.monotonic() < deadline, (len(server_certs), gateway_rotations)
                time.sleep(0.2)
                server_certs.add(tls_probe(inbound, ca))
                now = gateway_expiry()
                if now > last + 0.5:  # a renewed certificate lives longer than the old one
                    gateway_rotations += 1
                last = now
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        assert failures == [], failures[:5]
        assert counts[0] > 20 and counts[1] > 20, counts
        assert app.received[-1].headers["x-forwarded-client-cert"] == f"URI={GATEWAY}"


class _Peer(pb_grpc.TestServiceServicer):
    """Answers with the SPIFFE ID gRPC verified for the caller."""

    def UnaryCall(self, request: Any, context: Any) -> Any:  # noqa: N802
        ids = context.auth_context().get("peer_spiffe_id") or [b""]
        return pb.SimpleResponse(server_id=ids[0].decode())


def test_grpc_upstream_with_identity_reaches_a_tls_grpc_server(
        etcd_server, mesh: Mesh, signer: Signer, ca: TestCA) -> None:
    name = f"g-{uuid.uuid4().hex[:6]}"
    server = grpc.server(futures.ThreadPoolExecutor(4),
                         interceptors=[MeshServerInterceptor(mesh, service=name)])
    pb_grpc.add_TestServiceServicer_to_server(_Peer(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(
        StaticIdentitySource(ca.issue(name))))
    server.start()
    try:
        mesh.register(name, port, protocol="grpc", tls=True)
        wait_endpoints(mesh, name, 1)
        set_policy(mesh, name, {"mtls": {"mode": "strict"}})
        with gateway_shim(etcd_server, mesh.layout.prefix,
                          free_ports=(f"--upstream {name}={{}}",)) as gw:
            up_port = gw.ports[f"--upstream {name}={{}}"]
            with grpc.insecure_channel(f"127.0.0.1:{up_port}") as ch:
                stub = pb_grpc.TestServiceStub(ch)
                assert stub.UnaryCall(pb.SimpleRequest(), timeout=10).server_id == GATEWAY
    finally:
        server.stop(0).wait(5)



def test_wrong_server_identity_and_untrusted_client_are_refused(
        etcd_server, mesh: Mesh, signer: Signer, ca: TestCA, app: Upstream) -> None:
    """An instance registered under ``impostor`` that holds ``backend``'s certificate is
    refused by the calling shim (the SPIFFE ID names the destination service, not the
    address); a client certificate from another CA is refused at the inbound handshake."""
    name = f"be-{uuid.uuid4().hex[:6]}"
    impostor = f"imp-{uuid.uuid4().hex[:6]}"
    with backend_shim(etcd_server, mesh.layout.prefix, name, app.port) as back, \
            gateway_shim(etcd_server, mesh.layout.prefix) as gw:
        inbound = back.ports["--inbound-port"]
        mesh.register(impostor, inbound, tls=True)
        wait_endpoints(mesh, impostor, 1)
        set_policy(mesh, impostor, {"retries": {"attempts": 1}})
        with httpx.Client(base_url=f"http://127.0.0.1:{gw.port}", headers={"host": impostor},
                          trust_env=False, timeout=10) as client:
            r = client.get("/")
        assert r.status_code == 503, r.text
        assert f"spiffe://meshlib.local/svc/{name}" in r.text
        assert f"spiffe://meshlib.local/svc/{impostor}" in r.text
        assert app.count == 0

        foreign = client_context(TestCA().issue("gateway"))
        foreign.verify_mode = ssl.CERT_NONE  # only the server's check of us is under test
        with socket.create_connection(("127.0.0.1", inbound), timeout=5) as raw, \
                foreign.wrap_socket(raw) as tls:
            try:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
                answer = tls.recv(1024)
            except (ssl.SSLError, OSError) as exc:
                answer = repr(exc).encode()
        assert not answer.startswith(b"HTTP/"), answer  # the server closed the handshake
        assert app.count == 0
        text = back.admin("/metrics")[1].decode()
        assert any(ln.startswith("meshlib_mtls_refused_total") and 'side="server"' in ln
                   and 'reason="handshake"' in ln and not ln.endswith(" 0.0")
                   for ln in text.splitlines()), text
