"""``MeshPort``: the seven members of ``Mesh`` the drivers use, declared in the core.

mypy checks that ``Mesh`` satisfies the port (``meshlib.mesh._port``); these tests hold the
same promise at run time (members and parameter names), and show that the port is enough to
build a driver: an httpx transport over a fixed snapshot, with no etcd and no ``Mesh``.
"""

from __future__ import annotations

import ast
import functools
import http.server
import inspect
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.config import DEFAULT_POLICY
from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.discovery.mesh_names import MeshNames
from meshlib.mesh import Mesh
from meshlib.ports import CallKind, MeshPort, SnapshotListener
from meshlib.telemetry.recorders import HttpClientRecorder, RpcClientRecorder

PORT_MEMBERS = ("service", "names", "destination", "call_observer", "add_listener", "watch", "snapshot")


def test_port_declares_the_seven_members() -> None:
    declared = {n for n in vars(MeshPort) if not n.startswith("_")}
    assert declared == set(PORT_MEMBERS)


@pytest.mark.parametrize("package", ["http", "grpc", "server"])
def test_drivers_import_the_port_not_the_facade(package: str) -> None:
    """Arrows run from drivers to the port: no driver module imports ``meshlib.mesh`` (not
    even for typing), so mypy holds every driver to the port's members alone."""
    root = Path(meshlib.__file__).parent / package
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "meshlib.mesh" or (
                    isinstance(node, ast.Import)
                    and any(a.name == "meshlib.mesh" for a in node.names)):
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("name", [n for n in PORT_MEMBERS if n not in ("service", "names")])
def test_mesh_methods_match_the_port(name: str) -> None:
    want = inspect.signature(getattr(MeshPort, name))
    have = inspect.signature(getattr(Mesh, name))
    assert list(have.parameters) == list(want.parameters), name
    for p in want.parameters.values():
        assert have.parameters[p.name].default == p.default, (name, p.name)


class StaticPort:
    """A port over one fixed snapshot: what a test or a shim without etcd can hand a driver."""

    def __init__(self, snap: ServiceSnapshot) -> None:
        self.service: str | None = "caller"
        self.names = MeshNames()
        self._snap = snap
        self._dests: dict[str, DestinationState] = {}
        self.watched: list[str] = []
        self.observed: list[tuple[str, str]] = []

    def destination(self, service: str) -> DestinationState:
        if service not in self._dests:
            self._dests[service] = DestinationState(
                service, functools.partial(self.snapshot, service))
        return self._dests[service]

    def call_observer(self, kind: CallKind, service: str) -> Any:
        self.observed.append((kind, service))
        if kind == "grpc":
            return RpcClientRecorder.for_service(service)
        return HttpClientRecorder.for_service(service)

    def add_listener(self, listener: SnapshotListener) -> Callable[[], None]:
        return lambda: None

    def watch(self, service: str) -> None:
        self.watched.append(service)

    def snapshot(self, service: str) -> ServiceSnapshot:
        if service == self._snap.service:
            return self._snap
        return ServiceSnapshot(service, policy=DEFAULT_POLICY)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = f"{self.path} caller={self.headers.get('x-mesh-caller')}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hello_server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_transport_runs_on_the_port_alone(hello_server: int) -> None:
    from meshlib.http import MeshTransport

    ep = Endpoint("orders", "a", "127.0.0.1", hello_server, key="/static/orders/a")
    port = StaticPort(ServiceSnapshot("orders", (ep,), policy=DEFAULT_POLICY))
    assert isinstance(port, MeshPort)
    with httpx.Client(transport=MeshTransport(port, passthrough=False)) as client:
        resp = client.get("http://orders/hi")
    assert resp.status_code == 200
    assert resp.text == "/hi caller=caller"
    assert port.observed == [("http", "orders")]
