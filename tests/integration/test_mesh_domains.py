"""Mesh domains set by argument, environment or the etcd key ``defaults/domains``, seen by
the HTTP clients: ``http://orders.mesh/`` reaches the service ``orders``.

Real etcd, a real upstream registered as ``orders``, the sync mesh client. The etcd key is
changed at run time and the client follows it (waiting for the watch event, not sleeping).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from http_servers import Upstream, register, wait_endpoints

from meshlib.http import NotAMeshServiceError
from meshlib.mesh import Mesh
from meshlib.testing import EtcdServer


@pytest.fixture
def orders() -> Iterator[Upstream]:
    up = Upstream("orders-1")
    yield up
    up.stop()


def _until(pred: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < end, "not reached"
        time.sleep(0.01)


def test_domains_argument(etcd_server: EtcdServer, etcd_prefix: str,
                          orders: Upstream) -> None:
    with Mesh(etcd_server.endpoint, prefix=etcd_prefix, domains=["mesh"]) as mesh:
        register(mesh, "orders", orders)
        wait_endpoints(mesh, "orders", 1)
        with mesh.http_client(passthrough=False) as client:
            r = client.get("http://orders.mesh:9999/x")
        assert r.status_code == 200
        # the port is ignored (the instance's own port is used); Host is as written
        assert orders.received[-1].headers["host"] == "orders.mesh:9999"
        assert mesh.names.source == "argument"


def test_domains_from_the_environment(etcd_server: EtcdServer, etcd_prefix: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLIB_MESH_DOMAINS", "internal, svc.cluster.local")
    with Mesh(etcd_server.endpoint, prefix=etcd_prefix) as mesh:
        assert mesh.names.domains == ("internal", "svc.cluster.local")
    monkeypatch.setenv("MESHLIB_MESH_DOMAINS", "in valid")
    with pytest.raises(ValueError, match=r"MESHLIB_MESH_DOMAINS\[0\]='in valid'"):
        Mesh(etcd_server.endpoint, prefix=etcd_prefix)


def test_domains_from_the_etcd_key_follow_changes(mesh: Mesh, orders: Upstream) -> None:
    register(mesh, "orders", orders)
    wait_endpoints(mesh, "orders", 1)
    with mesh.http_client(passthrough=False) as client:
        with pytest.raises(NotAMeshServiceError, match="mesh domains: none configured"):
            client.get("http://orders.mesh/x")
        mesh.client.put(mesh.layout.domains_key, b'["mesh"]')
        _until(lambda: mesh.names.domains == ("mesh",))
        assert client.get("http://orders.mesh/x").status_code == 200
        # an invalid value is refused and the last valid domains stay
        mesh.client.put(mesh.layout.domains_key, b"bad_domain")
        mesh.client.put(mesh.layout.domains_key, b"mesh,internal")
        _until(lambda: mesh.names.domains == ("mesh", "internal"))
        assert client.get("http://orders.internal/x").status_code == 200
        mesh.client.delete(mesh.layout.domains_key)
        _until(lambda: mesh.names.domains == ())
        with pytest.raises(NotAMeshServiceError):
            client.get("http://orders.mesh/x")
