"""Mesh mTLS on gRPC: per-endpoint secure channels (meshlib.grpc.pool) against a grpcio server
with ``grpc.dynamic_ssl_server_credentials`` (meshlib.server.tls) and the mesh interceptor;
real TLS on loopback, certificates from the identity test CA, mode and access policy in real
etcd. Rotations run under continuous sync and aio traffic."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_servers import pb, pb_grpc
from http_servers import set_policy, wait_endpoints
from mtls_helpers import rotate_ca

from meshlib.grpc import AioMeshChannel, MeshChannel
from meshlib.identity import StaticIdentitySource
from meshlib.identity.testing import TestCA
from meshlib.mesh import Mesh
from meshlib.server import MeshServerInterceptor
from meshlib.server.tls import grpc_server_credentials
from meshlib.telemetry.metrics import MTLS_REFUSED

STRICT = {"mtls": {"mode": "strict"}}


class _Peer(pb_grpc.TestServiceServicer):
    """Answers with the SPIFFE ID grpc verified for the caller."""

    def UnaryCall(self, request: Any, context: Any) -> Any:
        ids = context.auth_context().get("peer_spiffe_id") or [b""]
        return pb.SimpleResponse(server_id=ids[0].decode())


class TLSGrpcServer:
    def __init__(self, source: Any, mesh: Mesh, service: str = "orders") -> None:
        self.source = source
        self.server = grpc.server(futures.ThreadPoolExecutor(16),
                                  interceptors=[MeshServerInterceptor(mesh, service=service)])
        pb_grpc.add_TestServiceServicer_to_server(_Peer(), self.server)
        self.port = self.server.add_secure_port("127.0.0.1:0", grpc_server_credentials(source))

    def __enter__(self) -> TLSGrpcServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


def serve(mesh: Mesh, srv: TLSGrpcServer, iid: str, policy: dict[str, Any] = STRICT) -> None:
    mesh.register("orders", srv.port, instance_id=iid, protocol="grpc", tls=True)
    wait_endpoints(mesh, "orders", 1)
    set_policy(mesh, "orders", policy)


@pytest.fixture
def orders(mesh: Mesh, ca: TestCA) -> Iterator[TLSGrpcServer]:
    with TLSGrpcServer(StaticIdentitySource(ca.issue("orders")), mesh) as srv:
        serve(mesh, srv, "orders-g1")
        yield srv


def call(ch: Any) -> str:
    stub = pb_grpc.TestServiceStub(ch)
    return str(stub.UnaryCall(pb.SimpleRequest(), timeout=5).server_id)


GATEWAY = "spiffe://meshlib.local/svc/gateway"


def test_secure_channel_and_verified_identity(mesh: Mesh, ca: TestCA,
                                              orders: TLSGrpcServer) -> None:
    with MeshChannel(mesh, "orders", identity=StaticIdentitySource(ca.issue("gateway"))) as ch:
        assert call(ch) == GATEWAY


def _load(mesh: Mesh, client_src: Any, stop: threading.Event,
          failures: list[BaseException], counts: list[int],
          opened: list[int] | None = None) -> list[threading.Thread]:
    def sync_loop() -> None:
        with MeshChannel(mesh, "orders", identity=client_src, drain_timeout=5) as ch:
            if opened is not None:
                opened.append(0)
            stub = pb_grpc.TestServiceStub(ch)
            while not stop.is_set():
                try:
                    assert stub.UnaryCall(pb.SimpleRequest(), timeout=5).server_id == GATEWAY
                    counts[0] += 1
                except BaseException as exc:  # noqa: BLE001
                    failures.append(exc)
            if opened is not None:
                opened[0] = ch.pool.opened

    async def aio_loop() -> None:
        ch = AioMeshChannel(mesh, "orders", identity=client_src, drain_timeout=5)
        stub = pb_grpc.TestServiceStub(ch)
        while not stop.is_set():
            try:
                r = await stub.UnaryCall(pb.SimpleRequest(), timeout=5)
                assert r.server_id == GATEWAY
                counts[1] += 1
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)
        await ch.close()

    threads = [threading.Thread(target=sync_loop),
               threading.Thread(target=lambda: asyncio.run(aio_loop()))]
    for t in threads:
        t.start()
    return threads


def test_rotation_under_continuous_traffic_fails_no_call(
        mesh: Mesh, ca: TestCA, orders: TLSGrpcServer) -> None:
    client_src = StaticIdentitySource(ca.issue("gateway"))
    failures: list[BaseException] = []
    counts = [0, 0]
    stop = threading.Event()
    opened: list[int] = []
    threads = _load(mesh, client_src, stop, failures, counts, opened)
    seen: list[int] = []
    for _ in range(6):
        time.sleep(0.4)
        seen.append(sum(counts))
        orders.source.set(ca.issue("orders"))
        client_src.set(ca.issue("gateway"))
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join(20)
    assert not failures, failures[:3]
    assert counts[0] > 20 and counts[1] > 20
    assert sum(counts) > seen[-1]  # calls went on after the last rotation
    assert opened[0] == 7  # one channel, then a new one per rotation (the old ones drained)


def test_client_without_identity_refused_in_strict(mesh: Mesh, orders: TLSGrpcServer) -> None:
    with MeshChannel(mesh, "orders") as ch, pytest.raises(
            RuntimeError, match="strict .* no mesh identity"):
        call(ch)


def test_ca_rotation_with_overlapping_bundle_fails_no_call(mesh: Mesh, ca: TestCA) -> None:
    ca2 = TestCA()
    server_src = StaticIdentitySource(ca.issue("orders"))
    client_src = StaticIdentitySource(ca.issue("gateway"))
    failures: list[BaseException] = []
    counts = [0, 0]
    stop = threading.Event()
    with TLSGrpcServer(server_src, mesh) as srv:
        serve(mesh, srv, "orders-gca")
        threads = _load(mesh, client_src, stop, failures, counts)
        rotate_ca(server_src, client_src, ca2, ca.bundle_pem, "orders", "gateway", 0.5)
        stop.set()
        for t in threads:
            t.join(20)
    assert not failures, failures[:3]
    assert counts[0] > 10 and counts[1] > 10


def refused(reason: str) -> float:
    return MTLS_REFUSED.labels("client", reason)._value.get()  # type: ignore[no-any-return]


def test_certificate_of_another_service_is_refused(mesh: Mesh, ca: TestCA) -> None:
    before = refused("wrong_identity")
    with TLSGrpcServer(StaticIdentitySource(ca.issue("billing")), mesh) as srv:
        serve(mesh, srv, "orders-gimp", {**STRICT, "retries": {"attempts": 1}})
        with MeshChannel(mesh, "orders",
                         identity=StaticIdentitySource(ca.issue("gateway"))) as ch:
            with pytest.raises(grpc.RpcError) as info:
                call(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Hostname Verification Check failed" in str(info.value.details())
    assert refused("wrong_identity") == before + 1


def test_expired_server_certificate_is_refused(mesh: Mesh, ca: TestCA) -> None:
    before = refused("handshake")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    with TLSGrpcServer(StaticIdentitySource(ca.issue("orders", now=old)), mesh) as srv:
        serve(mesh, srv, "orders-gexp", {**STRICT, "retries": {"attempts": 1}})
        with MeshChannel(mesh, "orders",
                         identity=StaticIdentitySource(ca.issue("gateway"))) as ch:
            with pytest.raises(grpc.RpcError) as info:
                call(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refused("handshake") == before + 1, info.value.details()


def test_access_policy_by_verified_identity_ignores_forged_caller(
        mesh: Mesh, ca: TestCA, orders: TLSGrpcServer) -> None:
    set_policy(mesh, "orders", {**STRICT, "access": {"allow": ["gateway"]}})
    with MeshChannel(mesh, "orders", identity=StaticIdentitySource(ca.issue("gateway"))) as ch:
        assert call(ch) == GATEWAY
    with MeshChannel(mesh, "orders",
                     identity=StaticIdentitySource(ca.issue("intruder"))) as ch:
        stub = pb_grpc.TestServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.UnaryCall(pb.SimpleRequest(), timeout=5,
                           metadata=(("x-mesh-caller", "gateway"),))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'intruder' may not call" in str(info.value.details())


def test_end_to_end_with_signer_renewals_under_traffic(etcd_server: Any, etcd_prefix: str,
                                                       tmp_path: Any) -> None:
    """Mesh(identity=True) on both sides with the real signer (6 s certificates): gRPC calls
    through mesh.grpc_channel() keep succeeding across renewals of both certificates."""
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
        leaves: tuple[set[bytes], set[bytes]] = (set(), set())  # distinct certificates seen
        with TLSGrpcServer(m_orders.identity, m_orders) as srv:
            m_orders.register("orders", srv.port, instance_id="orders-ge2e", protocol="grpc",
                              tls=True)
            wait_endpoints(m_gw, "orders", 1)
            set_policy(m_gw, "orders", STRICT)
            failures: list[BaseException] = []
            calls = 0
            deadline = time.monotonic() + 30
            with m_gw.grpc_channel("orders", drain_timeout=5) as ch:
                assert call(ch) == GATEWAY  # the first channel exists from here on
                # subscribed after the channel pool: told of a rotation after the pool is
                m_orders.identity.subscribe(lambda c: leaves[0].add(c.cert_chain_pem))
                m_gw.identity.subscribe(lambda c: leaves[1].add(c.cert_chain_pem))

                def renewed() -> int:
                    return min(len(x) for x in leaves)
                while renewed() < 2 and time.monotonic() < deadline:
                    try:
                        assert call(ch) == GATEWAY
                        calls += 1
                    except BaseException as exc:  # noqa: BLE001
                        failures.append(exc)
                assert call(ch) == GATEWAY  # after the last rotation: on a new channel
                opened = ch.pool.opened
            assert renewed() >= 2
            assert not failures, failures[:3]
            assert calls > 50 and opened >= 3  # a new channel per client rotation
