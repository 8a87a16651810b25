"""Node.js on both ends, mesh mTLS between: a Node client calls ``gateway``'s shim in clear
text on loopback, the shim connects with mTLS to the backend's shim inbound port (``strict``),
which hands the request to a Node service with the verified caller in ``x-mesh-caller``.
Neither Node program has a line of TLS code (adapters/node). Real etcd, a real signer, real
shim processes, ``node`` as a user runs it."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_servers import set_policy, wait_endpoints
from shim_harness import ShimProcess, exchange, split_response
from test_shim_node import NODE_DIR, node_binary, run_node

from meshlib.discovery.etcd_client import EtcdClient
from meshlib.identity.authority import Authority
from meshlib.identity.signer import Signer
from meshlib.identity.testing import TestCA
from meshlib.mesh import Mesh


@pytest.fixture
def signer(etcd_server: Any, etcd_prefix: str, tmp_path: Path) -> Iterator[Signer]:
    authority = Authority.load(TestCA().write_dir(tmp_path / "ca"))
    client = EtcdClient(etcd_server.endpoint, timeout=3)
    s = Signer(client, authority, prefix=etcd_prefix, lifetime=dt.timedelta(minutes=5))
    assert s.wait_active(10)
    yield s
    s.close()
    client.close()


def test_node_client_to_node_service_over_shim_mtls(etcd_server: Any, mesh: Mesh,
                                                    signer: Signer) -> None:
    name = f"node-{uuid.uuid4().hex[:8]}"
    node = subprocess.Popen([node_binary(), str(NODE_DIR / "service.js"), "--port", "0",
                             "--name", name], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        word, port_text = node.stdout.readline().split()
        assert word == "listening"
        prefix = mesh.layout.prefix
        with ShimProcess(etcd_server.endpoint, prefix, "--service", name, "--app-port",
                         port_text, "--health-path", "/health", "--identity", "on",
                         wait="/ready", free_ports=("--inbound-port",)) as back, \
                ShimProcess(etcd_server.endpoint, prefix, "--service", "gateway",
                            "--identity", "on", wait="/ready") as gw:
            wait_endpoints(mesh, name, 1)
            assert mesh.snapshot(name).endpoints[0].tls
            set_policy(mesh, name, {"mtls": {"mode": "strict"}})
            inbound = back.ports["--inbound-port"]
            bare = (f"GET /orders/1 HTTP/1.1\r\nHost: {name}\r\nx-mesh-caller: gateway\r\n"
                    "Connection: close\r\n\r\n").encode()
            deadline = time.monotonic() + 10
            while split_response(exchange(inbound, bare))[0] != 403:  # strict in force
                assert time.monotonic() < deadline, "strict not applied"
                time.sleep(0.02)
            out = run_node("http_host_client.js", "--shim", f"127.0.0.1:{gw.port}", name,
                           "/orders/7")
            assert out["status"] == 200, out
            body = json.loads(out["body"])
            # strict: only a verified mesh certificate gets through; the caller is its service
            assert body["id"] == "7" and body["served_by"] == name
            assert body["caller"] == "gateway"
    finally:
        node.terminate()
        node.wait(10)
