"""The shim resolves destinations with the library's naming rule
(``meshlib.discovery.mesh_names.mesh_service``) under the mesh domains of the etcd key
``defaults/domains``, and follows changes of that key.

A real shim process, a real etcd and a real registered upstream; requests over raw sockets.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from http_servers import Upstream, register, wait_endpoints
from shim_harness import ShimProcess, exchange, status_of

from meshlib.mesh import Mesh


@pytest.fixture
def prefix() -> str:
    return f"/meshlib-test/{uuid.uuid4().hex}/v1"


@pytest.fixture
def mmesh(etcd_server, prefix) -> Iterator[Mesh]:  # type: ignore[no-untyped-def]
    with Mesh(etcd_server.endpoint, prefix=prefix, handle_sigterm=False) as m:
        yield m


def _get(port: int, host: str) -> int:
    return status_of(exchange(
        port, f"GET /d HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()))


def _until_status(port: int, host: str, status: int, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while (got := _get(port, host)) != status:
        assert time.monotonic() < end, f"{host}: {got}, wanted {status}"
        time.sleep(0.05)


def test_shim_uses_the_mesh_domains_of_the_etcd_key(etcd_server, prefix, mmesh) -> None:  # type: ignore[no-untyped-def]
    up = Upstream("orders-d")
    try:
        register(mmesh, "orders", up)
        wait_endpoints(mmesh, "orders", 1)
        mmesh.client.put(mmesh.layout.domains_key, b'["mesh"]')
        with ShimProcess(etcd_server.endpoint, prefix) as shim:
            _until_status(shim.port, "orders.mesh", 200)
            assert up.received[-1].path == "/d"
            assert _get(shim.port, "orders.other") == 403
            mmesh.client.put(mmesh.layout.domains_key, b"other")
            _until_status(shim.port, "orders.other", 200)
            assert _get(shim.port, "orders.mesh") == 403
            assert _get(shim.port, "orders") == 200
    finally:
        up.kill()
