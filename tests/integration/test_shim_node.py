"""Node.js apps in the mesh through the shim (issue 12, section 4): real etcd, real shim
processes (``python -m meshlib.shim``), real Python services and ``node`` running the
adapters in adapters/node exactly as a user would.

* a Node client calls a Python service through the shim, naming it in ``Host`` and through
  ``HTTP_PROXY``; a Node gRPC client calls a Python gRPC service through ``--upstream``;
* a Node service registered and health-checked by its own shim is called by name from Python;
* the shim's ``/metrics`` and the library's exposition (this process, which made the same
  kinds of calls through ``mesh.http_client()`` / ``mesh.grpc_channel()``) have the same
  families, label names and buckets.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from grpc_servers import TestServer, pb, pb_grpc
from http_servers import Upstream, eventually, register, wait_endpoints
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from shim_harness import ShimProcess

from meshlib.mesh import Mesh
from meshlib.telemetry.semconv import ALL_FAMILIES

NODE_DIR = pathlib.Path(__file__).resolve().parents[2] / "adapters" / "node"


def node_binary() -> str:
    node = shutil.which("node")
    assert node, "Node.js (`node`) is not on PATH: install Node.js >= 18 (see docs/shim.md)"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "adapters/node/node_modules is missing: run `make node-deps` (npm ci in adapters/node)")
    return node


def run_node(script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    full_env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy")}
    full_env.update(env or {})
    proc = subprocess.run([node_binary(), str(NODE_DIR / script), *args], capture_output=True,
                          text=True, timeout=60, env=full_env)
    assert proc.returncode in (0, 3), (script, args, proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"/meshlib-test/{uuid.uuid4().hex}/v1"


@pytest.fixture(scope="module")
def mmesh(etcd_server: Any, prefix: str) -> Iterator[Mesh]:
    with Mesh(etcd_server.endpoint, prefix=prefix, handle_sigterm=False) as m:
        yield m


@pytest.fixture(scope="module")
def grpc_service(mmesh: Mesh) -> Iterator[tuple[str, TestServer]]:
    name = f"grpc-{uuid.uuid4().hex[:8]}"
    server = TestServer("py-grpc").start()
    mmesh.register(name, server.port, protocol="grpc")
    mmesh.wait_for(name)
    yield name, server
    server.stop()


@pytest.fixture(scope="module")
def shim(etcd_server: Any, prefix: str, grpc_service: Any) -> Iterator[ShimProcess]:
    """The app's shim: outbound HTTP, and a gRPC upstream listener for the gRPC service."""
    upstream = f"--upstream {grpc_service[0]}={{}}"  # the harness picks the port
    with ShimProcess(etcd_server.endpoint, prefix, free_ports=(upstream,)) as s:
        s.grpc_port = s.ports[upstream]  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def py_service(mmesh: Mesh) -> Iterator[tuple[str, Upstream]]:
    name = f"py-{uuid.uuid4().hex[:8]}"
    up = Upstream(f"{name}-0")
    register(mmesh, name, up)
    wait_endpoints(mmesh, name, 1)
    yield name, up
    up.kill()


# --------------------------------------------------------------------------- Node -> Python


def test_node_client_by_host_header(shim: ShimProcess, py_service: Any) -> None:
    name, up = py_service
    out = run_node("http_host_client.js", "--shim", f"127.0.0.1:{shim.port}", name,
                   "/orders/7?x=1")
    assert out["status"] == 200 and out["body"] == up.name
    rec = up.received[-1]
    assert (rec.method, rec.path, rec.headers["host"]) == ("GET", "/orders/7?x=1", name)


def test_node_client_through_http_proxy(shim: ShimProcess, py_service: Any) -> None:
    name, up = py_service
    out = run_node("http_proxy_client.js", "--method", "POST", "--data", '{"qty": 2}',
                   f"http://{name}/orders", env={"HTTP_PROXY": f"http://127.0.0.1:{shim.port}"})
    assert out["status"] == 200 and out["body"] == up.name
    rec = up.received[-1]
    assert (rec.method, rec.path, rec.body) == ("POST", "/orders", b'{"qty": 2}')


def test_node_client_unknown_service_is_refused(shim: ShimProcess) -> None:
    out = run_node("http_host_client.js", "--shim", f"127.0.0.1:{shim.port}", "no-such-svc", "/")
    assert out["status"] >= 400 and "no-such-svc" in out["body"]  # refused, named


def test_node_grpc_client_through_upstream(shim: ShimProcess, grpc_service: Any) -> None:
    _name, server = grpc_service
    out = run_node("grpc_client.js", "--target", f"127.0.0.1:{shim.grpc_port}",  # type: ignore[attr-defined]
                   "--timeout", "5", "meshtest.TestService/UnaryCall", '{"response_size": 4}')
    assert out["code"] == 0 and out["responses"][0]["server_id"] == "py-grpc"
    assert server.calls["UnaryCall"] >= 1


# --------------------------------------------------------------------------- Python -> Node


def test_python_calls_node_service_by_name(etcd_server: Any, prefix: str, mmesh: Mesh) -> None:
    name = f"node-{uuid.uuid4().hex[:8]}"
    # port 0: the service listens on a port of the kernel's choosing and prints it
    node = subprocess.Popen([node_binary(), str(NODE_DIR / "service.js"), "--port", "0",
                             "--name", name], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        word, port_text = node.stdout.readline().split()
        assert word == "listening" and int(port_text) > 0
        app_port = int(port_text)
        with ShimProcess(etcd_server.endpoint, prefix, "--service", name, "--app-port",
                         str(app_port), "--health-path", "/health", "--health-interval", "0.2",
                         wait="/ready"):
            mmesh.wait_for(name)
            with mmesh.http_client() as http:
                r = http.get(f"http://{name}/orders/7")
            assert r.status_code == 200
            body = r.json()
            assert body["id"] == "7" and body["served_by"] == name and body["pid"] == node.pid
            # the health check deregisters it while /health fails, and registers it again
            with mmesh.http_client() as http:
                http_direct = f"http://127.0.0.1:{app_port}"
                import httpx

                with httpx.Client(trust_env=False) as plain:
                    assert plain.post(f"{http_direct}/health/fail").status_code == 200
                    assert eventually(lambda: not mmesh.snapshot(name).endpoints, 10)
                    assert plain.post(f"{http_direct}/health").status_code == 200
                assert eventually(lambda: mmesh.snapshot(name).endpoints, 10)
                assert http.get(f"http://{name}/orders/8").json()["id"] == "8"
    finally:
        node.terminate()
        node.wait(10)


# --------------------------------------------------------------------------- metrics


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def series_shape(fam: Any, label: str, value: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """(label names, sorted bucket bounds) of ``fam``'s samples whose ``label`` is ``value``."""
    names: set[str] = set()
    bounds: set[str] = set()
    for s in fam.samples:
        if s.labels.get(label) != value:
            continue
        names |= {k for k in s.labels if k != "le"}
        if "le" in s.labels:
            bounds.add(s.labels["le"])
    return frozenset(names), tuple(sorted(bounds, key=float))


def test_shim_metrics_match_the_library(shim: ShimProcess, mmesh: Mesh, py_service: Any,
                                         grpc_service: Any) -> None:
    http_name, _up = py_service
    grpc_name, _server = grpc_service
    # the same kinds of calls, once through the shim (Node apps), once through the library
    run_node("http_host_client.js", "--shim", f"127.0.0.1:{shim.port}", http_name, "/m")
    run_node("grpc_client.js", "--target", f"127.0.0.1:{shim.grpc_port}",  # type: ignore[attr-defined]
             "meshtest.TestService/UnaryCall", "{}")
    with mmesh.http_client() as http:
        assert http.get(f"http://{http_name}/m").status_code == 200
    with mmesh.grpc_channel(grpc_name) as ch:
        pb_grpc.TestServiceStub(ch).UnaryCall(pb.SimpleRequest())

    status, text = shim.admin("/metrics")
    assert status == 200
    shim_fams = families(text.decode())
    lib_fams = families(generate_latest(REGISTRY).decode())
    for spec in ALL_FAMILIES:  # every library family, with the same type and help
        name = spec.name  # the parser names counter families without "_total"
        assert name in shim_fams, f"{name} missing from the shim's /metrics"
        assert (shim_fams[name].type, shim_fams[name].documentation) == (
            lib_fams[name].type, lib_fams[name].documentation), name
    checks = [("http_client_request_duration_seconds", http_name),
              ("meshlib_client_attempt_duration_seconds", http_name),
              ("rpc_client_call_duration_seconds", grpc_name),
              ("meshlib_client_attempt_duration_seconds", grpc_name)]
    for fam, service in checks:
        shim_shape = series_shape(shim_fams[fam], "server_address", service)
        lib_shape = series_shape(lib_fams[fam], "server_address", service)
        assert shim_shape[0], f"{fam}: no shim series for {service}"
        assert shim_shape == lib_shape, (fam, service, shim_shape, lib_shape)


def test_curl_example(shim: ShimProcess, py_service: Any) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is not on PATH (Debian: apt-get install curl)"
    name, up = py_service
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy")}
    env["MESHLIB_SHIM"] = f"127.0.0.1:{shim.port}"
    proc = subprocess.run(["sh", str(NODE_DIR.parent / "curl" / "example.sh"), name, "/c"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines.count(up.name) == 3, proc.stdout  # Host, HTTP_PROXY and -x forms
    refused = lines[-1]
    assert refused.isdigit() and 400 <= int(refused) < 500, proc.stdout  # IP literal refused
