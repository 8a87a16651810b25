"""Mesh mTLS on meshlib's own HTTP connections (sync and async) against uvicorn serving with
meshlib.server.tls: real TLS 1.3 on loopback sockets, certificates from the identity test CA,
the mode and access policy from real etcd (the ``mesh`` fixture)."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from http_servers import set_policy, wait_endpoints
from mtls_helpers import TLSUvicorn, rotate_ca, source_for

from meshlib.http import AsyncMeshTransport, MeshTransport
from meshlib.identity import StaticIdentitySource
from meshlib.identity.testing import TestCA
from meshlib.mesh import Mesh
from meshlib.telemetry.metrics import MTLS_REFUSED
from meshlib.tls import client_context

STRICT = {"mtls": {"mode": "strict"}}


def refused(side: str, reason: str) -> float:
    return MTLS_REFUSED.labels(side, reason)._value.get()  # type: ignore[no-any-return]


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def orders(mesh: Mesh, ca: TestCA) -> Iterator[TLSUvicorn]:
    """``orders`` served with mTLS, registered with ``tls: true``, policy strict."""
    with TLSUvicorn(source_for(ca, "orders"), mesh, "orders") as srv:
        mesh.register("orders", srv.port, instance_id="orders-1", tls=True)
        wait_endpoints(mesh, "orders", 1)
        set_policy(mesh, "orders", STRICT)
        yield srv


def client(mesh: Mesh, source: Any) -> httpx.Client:
    return httpx.Client(transport=MeshTransport(mesh, identity=source), trust_env=False)


def test_record_advertises_tls(mesh: Mesh, orders: TLSUvicorn) -> None:
    (ep,) = mesh.snapshot("orders").endpoints
    assert ep.tls is True and ep.to_record()["tls"] is True


def test_sync_and_async_clients_speak_mtls_and_server_learns_identity(
        mesh: Mesh, ca: TestCA, orders: TLSUvicorn) -> None:
    src = source_for(ca, "gateway")
    with client(mesh, src) as http:
        r = http.get("http://orders/x", headers={"x-mesh-caller": "forged"})
        assert r.status_code == 200 and r.text == "peer=gateway"

    async def run() -> str:
        async with httpx.AsyncClient(transport=AsyncMeshTransport(mesh, identity=src),
                                     trust_env=False) as ah:
            return (await ah.get("http://orders/x")).text

    assert asyncio.run(run()) == "peer=gateway"


def test_permissive_sends_tls_only_to_advertising_instances(
        mesh: Mesh, ca: TestCA, orders: TLSUvicorn) -> None:
    set_policy(mesh, "orders", {"mtls": {"mode": "permissive"}})
    with client(mesh, source_for(ca, "gateway")) as http:
        assert http.get("http://orders/").text == "peer=gateway"
    # off: clear text to a TLS-only port fails (the server refuses a non-TLS request)
    set_policy(mesh, "orders", {"mtls": {"mode": "off"}, "retries": {"attempts": 1}})
    with client(mesh, source_for(ca, "gateway")) as http, pytest.raises(httpx.HTTPError):
        http.get("http://orders/")


def test_rotation_under_continuous_traffic_fails_no_call(
        mesh: Mesh, ca: TestCA, orders: TLSUvicorn) -> None:
    server_src = orders.tls.source
    client_src = source_for(ca, "gateway")
    failures: list[BaseException] = []
    calls = [0, 0]
    stop = threading.Event()

    def sync_loop() -> None:
        while not stop.is_set():
            with client(mesh, client_src) as http:  # a new client: new handshakes too
                for _ in range(20):
                    try:
                        r = http.get("http://orders/")
                        assert r.text == "peer=gateway", r.text
                        calls[0] += 1
                    except BaseException as exc:  # noqa: BLE001
                        failures.append(exc)

    async def async_loop() -> None:
        tr = AsyncMeshTransport(mesh, identity=client_src)
        async with httpx.AsyncClient(transport=tr, trust_env=False) as ah:
            while not stop.is_set():
                try:
                    r = await ah.get("http://orders/")
                    assert r.text == "peer=gateway", r.text
                    calls[1] += 1
                except BaseException as exc:  # noqa: BLE001
                    failures.append(exc)

    threads = [threading.Thread(target=sync_loop),
               threading.Thread(target=lambda: asyncio.run(async_loop()))]
    for t in threads:
        t.start()
    rotations = 6
    for _ in range(rotations):
        time.sleep(0.4)
        server_src.set(ca.issue("orders"))  # type: ignore[attr-defined]
        client_src.set(ca.issue("gateway"))
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join(20)
    assert not failures, failures[:3]
    assert orders.tls.rotations == rotations
    assert calls[0] > 20 and calls[1] > 20


def test_ca_rotation_with_overlapping_bundle_fails_no_call(mesh: Mesh, ca: TestCA) -> None:
    ca2 = TestCA()
    server_src = source_for(ca, "orders")
    client_src = source_for(ca, "gateway")
    failures: list[BaseException] = []
    stop = threading.Event()
    with TLSUvicorn(server_src, mesh, "orders") as srv:
        mesh.register("orders", srv.port, instance_id="orders-ca", tls=True)
        wait_endpoints(mesh, "orders", 1)
        set_policy(mesh, "orders", STRICT)

        def loop() -> None:
            while not stop.is_set():
                with client(mesh, client_src) as http:
                    for _ in range(10):
                        try:
                            assert http.get("http://orders/").text == "peer=gateway"
                        except BaseException as exc:  # noqa: BLE001
                            failures.append(exc)

        t = threading.Thread(target=loop)
        t.start()
        rotate_ca(server_src, client_src, ca2, ca.bundle_pem, "orders", "gateway", 0.4)
        stop.set()
        t.join(20)
    assert not failures, failures[:3]


def _one_attempt(mesh: Mesh) -> None:
    set_policy(mesh, "orders", {**STRICT, "retries": {"attempts": 1}})


def test_expired_server_certificate_is_refused(mesh: Mesh, ca: TestCA) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    with TLSUvicorn(source_for(ca, "orders", now=old), mesh, "orders") as srv:
        mesh.register("orders", srv.port, instance_id="orders-exp", tls=True)
        wait_endpoints(mesh, "orders", 1)
        _one_attempt(mesh)
        before = refused("client", "handshake")
        with client(mesh, source_for(ca, "gateway")) as http, \
                pytest.raises(httpx.ConnectError, match="certificate has expired"):
            http.get("http://orders/")
        assert refused("client", "handshake") == before + 1


def test_certificate_of_another_service_is_refused(mesh: Mesh, ca: TestCA) -> None:
    with TLSUvicorn(source_for(ca, "billing"), mesh, "orders") as srv:
        mesh.register("orders", srv.port, instance_id="orders-imp", tls=True)
        wait_endpoints(mesh, "orders", 1)
        _one_attempt(mesh)
        before = refused("client", "wrong_identity")
        with client(mesh, source_for(ca, "gateway")) as http, pytest.raises(
                httpx.ConnectError, match="svc/billing', expected 'spiffe://meshlib.local/svc/orders"):
            http.get("http://orders/")
        assert refused("client", "wrong_identity") == before + 1


def test_client_without_identity_refused_in_strict(mesh: Mesh, orders: TLSUvicorn) -> None:
    _one_attempt(mesh)
    before = refused("client", "no_identity")
    with httpx.Client(transport=MeshTransport(mesh), trust_env=False) as http, \
            pytest.raises(httpx.ConnectError, match="strict .* no mesh identity"):
        http.get("http://orders/")
    assert refused("client", "no_identity") == before + 1


def _raw_get(port: int, ctx: ssl.SSLContext, caller: str) -> bytes:
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 5)) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: orders\r\nx-mesh-caller: {caller}\r\n"
                  "Connection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_tls_client_without_certificate_and_forged_caller_refused_in_strict(
        mesh: Mesh, ca: TestCA, orders: TLSUvicorn) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.bundle_pem.decode())
    before = refused("server", "no_certificate")
    out = _raw_get(orders.port, bare, "gateway")
    assert out.startswith(b"HTTP/1.1 403") and b"mtls_required" in out
    assert refused("server", "no_certificate") == before + 1
    # permissive: the same client is accepted, on its header's word
    set_policy(mesh, "orders", {"mtls": {"mode": "permissive"}})
    assert _raw_get(orders.port, bare, "gateway").startswith(b"HTTP/1.1 200")


def test_access_policy_by_verified_identity(mesh: Mesh, ca: TestCA, orders: TLSUvicorn) -> None:
    set_policy(mesh, "orders", {**STRICT, "access": {"allow": ["gateway"]}})
    ok = client_context(ca.issue("gateway"))
    intruder = client_context(ca.issue("intruder"))
    assert _raw_get(orders.port, ok, "nobody").startswith(b"HTTP/1.1 200")
    denied = _raw_get(orders.port, intruder, "gateway")  # a forged header changes nothing
    assert denied.startswith(b"HTTP/1.1 403") and b"'intruder' may not call" in denied
    with client(mesh, StaticIdentitySource(ca.issue("intruder"))) as http:
        assert http.get("http://orders/").status_code == 403


def test_end_to_end_with_signer_renewals_under_traffic(etcd_server: Any, etcd_prefix: str,
                                                       tmp_path: Any) -> None:
    """Mesh(identity=True) on both sides, certificates from the real signer through etcd with a
    6 s lifetime (renewed at about half of it): HTTP calls through mesh.http_client() keep
    succeeding across several renewals of both certificates."""
    from meshlib.discovery.etcd_client import EtcdClient
    from meshlib.identity.authority import Authority
    from meshlib.identity.signer import Signer

    authority = Authority.load(TestCA().write_dir(tmp_path / "ca"), "meshlib.local")
    with EtcdClient(etcd_server.endpoint, timeout=3) as ec, \
            Signer(ec, authority, prefix=etcd_prefix, lifetime=dt.timedelta(seconds=6)), \
            Mesh(etcd_server.endpoint, prefix=etcd_prefix, service="orders", identity=True,
                 handle_sigterm=False) as m_orders, \
            Mesh(etcd_server.endpoint, prefix=etcd_prefix, service="gateway", identity=True,
                 handle_sigterm=False) as m_gw:
        assert m_orders.identity is not None and m_gw.identity is not None
        rotations = [0, 0]
        m_orders.identity.subscribe(lambda c: rotations.__setitem__(0, rotations[0] + 1))
        m_gw.identity.subscribe(lambda c: rotations.__setitem__(1, rotations[1] + 1))
        with TLSUvicorn(m_orders.identity, m_orders, "orders") as srv:
            m_orders.register("orders", srv.port, instance_id="orders-e2e", tls=True)
            wait_endpoints(m_gw, "orders", 1)
            set_policy(m_gw, "orders", STRICT)
            failures: list[BaseException] = []
            calls = 0
            deadline = time.monotonic() + 30
            with m_gw.http_client() as http:
                while min(rotations) < 2 and time.monotonic() < deadline:
                    try:
                        assert http.get("http://orders/").text == "peer=gateway"
                        calls += 1
                    except BaseException as exc:  # noqa: BLE001
                        failures.append(exc)
            assert min(rotations) >= 2, rotations
            assert not failures, failures[:3]
            assert calls > 50


@pytest.mark.filterwarnings("ignore:Uvicorn's native WSGI implementation:DeprecationWarning")
def test_wsgi_app_under_uvicorn_gets_the_verified_caller(mesh: Mesh, ca: TestCA) -> None:
    """A WSGI app (Flask) served by uvicorn through its WSGI adapter, with the mesh middleware
    at the ASGI level in front: same mTLS, same strict mode, same access policy."""
    from flask import Flask, request
    from uvicorn.middleware.wsgi import WSGIMiddleware

    flask_app = Flask("wsgi-mtls")

    @flask_app.get("/")
    def index() -> str:
        return f"wsgi caller-header={request.headers.get('x-mesh-caller')}"

    with TLSUvicorn(source_for(ca, "orders"), mesh, "orders",
                    app=WSGIMiddleware(flask_app)) as srv:  # type: ignore[arg-type]
        mesh.register("orders", srv.port, instance_id="orders-wsgi", tls=True)
        wait_endpoints(mesh, "orders", 1)
        set_policy(mesh, "orders", {**STRICT, "access": {"allow": ["gateway"]}})
        with client(mesh, source_for(ca, "gateway")) as http:
            assert http.get("http://orders/").text.startswith("wsgi")
        with client(mesh, source_for(ca, "intruder")) as http:
            assert http.get("http://orders/",
                            headers={"x-mesh-caller": "gateway"}).status_code == 403
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.check_hostname = False
        bare.load_verify_locations(cadata=ca.bundle_pem.decode())
        assert b"mtls_required" in _raw_get(srv.port, bare, "gateway")


def test_hedged_calls_use_mtls_too(mesh: Mesh, ca: TestCA, orders: TLSUvicorn) -> None:
    """Hedged attempts (thread pool in the sync driver, tasks in the async one) connect with
    the same TLS target as plain attempts."""
    set_policy(mesh, "orders", {**STRICT, "retries": {"hedging": {"enabled": True,
                                                                  "delay": "1ms"}}})
    src = source_for(ca, "gateway")
    with client(mesh, src) as http:
        for _ in range(5):
            assert http.get("http://orders/").text == "peer=gateway"

    async def run() -> list[str]:
        async with httpx.AsyncClient(transport=AsyncMeshTransport(mesh, identity=src),
                                     trust_env=False) as ah:
            return [(await ah.get("http://orders/")).text for _ in range(5)]

    assert asyncio.run(run()) == ["peer=gateway"] * 5


def test_peer_of_another_trust_domain_is_not_a_verified_caller(mesh: Mesh, ca: TestCA) -> None:
    """Even with its root in the bundle, a certificate of trust domain ``other.example`` does
    not name a caller of this mesh: strict refuses it."""
    foreign = TestCA("other.example")
    server = ca.issue("orders").with_trust_bundle(ca.bundle_pem + foreign.bundle_pem)
    with TLSUvicorn(StaticIdentitySource(server), mesh, "orders") as srv:
        mesh.register("orders", srv.port, instance_id="orders-td", tls=True)
        wait_endpoints(mesh, "orders", 1)
        set_policy(mesh, "orders", STRICT)
        stranger = client_context(foreign.issue("gateway"))
        stranger.load_verify_locations(cadata=ca.bundle_pem.decode())
        assert b"mtls_required" in _raw_get(srv.port, stranger, "gateway")
        assert _raw_get(srv.port, client_context(ca.issue("gateway")), "x").startswith(
            b"HTTP/1.1 200")
