"""A Node.js gRPC client (@grpc/grpc-js, adapters/node/grpc_client.js) calls a Python grpcio
service through the shim's named upstream listener (issue 12, sections 1 and 4).

Real processes and sockets: etcd, grpcio servers registered as ``orders``, the listener
(``meshlib.shim.grpc_proxy.start_upstream``), and ``node`` running the adapter exactly as a
user would. Node packages come from ``make node-deps`` (``npm ci`` in adapters/node).
"""

from __future__ import annotations

import base64
import json
import pathlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from grpc_servers import ECHO_INITIAL, ECHO_TRAILING, TestServer

from meshlib.shim.grpc_proxy import start_upstream

SERVICE = "orders"
NODE_DIR = pathlib.Path(__file__).resolve().parents[2] / "adapters" / "node"


def node_binary() -> str:
    node = shutil.which("node")
    assert node, "Node.js (`node`) is not on PATH: install Node.js >= 18 (see docs/shim.md)"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "adapters/node/node_modules is missing: run `make node-deps` (npm ci in adapters/node)")
    return node


@pytest.fixture
def servers(mesh: Any) -> Iterator[Callable[[str], TestServer]]:
    started: list[TestServer] = []

    def start(server_id: str) -> TestServer:
        s = TestServer(server_id).start()
        started.append(s)
        mesh.register(SERVICE, s.port, protocol="grpc", instance_id=server_id)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def grpc_node(mesh: Any) -> Iterator[Callable[..., dict[str, Any]]]:
    """Run adapters/node/grpc_client.js against a fresh upstream listener for ``orders``."""
    node = node_binary()
    handle = start_upstream(mesh, SimpleNamespace(service=SERVICE, port=0, bind="127.0.0.1"))

    def run(method: str, request: Any = None, *args: str, ok: bool = True) -> dict[str, Any]:
        cmd = [node, str(NODE_DIR / "grpc_client.js"), "--target", f"127.0.0.1:{handle.port}",
               *args, f"meshtest.TestService/{method}", json.dumps(request or {})]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == (0 if ok else 3), (proc.returncode, proc.stdout, proc.stderr)
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    yield run
    handle.stop(0.5)


def test_unary_and_metadata(mesh: Any, servers: Any, grpc_node: Any) -> None:
    servers("a")
    mesh.wait_for(SERVICE)
    trailing = base64.b64encode(b"\xab\x01").decode()
    out = grpc_node("UnaryCall", {"response_size": 1000}, "--metadata",
                    json.dumps({ECHO_INITIAL: "from-node", ECHO_TRAILING: trailing}))
    assert out["code"] == 0 and out["responses"][0]["server_id"] == "a"
    assert len(base64.b64decode(out["responses"][0]["payload"]["body"])) == 1000
    assert out["initial"][ECHO_INITIAL] == "from-node"
    assert out["trailers"][ECHO_TRAILING] == trailing


def test_streams_both_ways(mesh: Any, servers: Any, grpc_node: Any) -> None:
    servers("a")
    mesh.wait_for(SERVICE)
    out = grpc_node("StreamingOutputCall", {"response_sizes": [3, 1, 4]})
    assert [len(base64.b64decode(r["payload"]["body"])) for r in out["responses"]] == [3, 1, 4]
    body = base64.b64encode(b"x" * 10).decode()
    out = grpc_node("StreamingInputCall", [{"payload": {"body": body}}] * 3)
    assert out["responses"][0]["aggregated_payload_size"] == 30
    out = grpc_node("FullDuplexCall", [{"response_sizes": [2]}, {"response_sizes": [5, 6]}])
    assert [len(base64.b64decode(r["payload"]["body"])) for r in out["responses"]] == [2, 5, 6]


def test_status_and_details(mesh: Any, servers: Any, grpc_node: Any) -> None:
    servers("a")
    mesh.wait_for(SERVICE)
    out = grpc_node("UnaryCall", {"action": "status", "code": 5, "message": "no such order"},
                    ok=False)
    assert out["name"] == "NOT_FOUND" and out["details"] == "no such order"


def test_deadline_from_node(mesh: Any, servers: Any, grpc_node: Any) -> None:
    servers("a")
    mesh.wait_for(SERVICE)
    out = grpc_node("UnaryCall", {"action": "sleep", "sleep_ms": 5000}, "--timeout", "0.5",
                    ok=False)
    assert out["name"] == "DEADLINE_EXCEEDED"


def test_node_unary_retried_by_the_shim(mesh: Any, servers: Any, grpc_node: Any) -> None:
    """grpc-js sends a unary request and its end together, so the shim forwards it as a
    replayable call and retries it elsewhere (A6), as the library does."""
    a, _ = servers("a"), servers("b")
    mesh.wait_for(SERVICE, 2)
    a.mode = "unavailable"
    outs = []
    while len(outs) < 20 and (len(outs) < 4 or not a.total()):  # until a was picked once
        outs.append(grpc_node("UnaryCall", {}))
    assert {o["responses"][0]["server_id"] for o in outs} == {"b"}
    retried = [o for o in outs if o["responses"][0].get("previous_attempts")]
    assert a.total() == len(retried) and retried
