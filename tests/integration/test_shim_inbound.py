"""The shim's inbound port: the library's server middleware in front of a non-Python app.

A library client calls the app by name; the registered port is the shim's inbound port, so
every call passes the access policy, the inbound deadline, trace extraction and the server
metrics before it reaches the app.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from http_servers import Upstream, set_policy
from shim_harness import ShimProcess, SimpleApp

from meshlib.mesh import Mesh


@pytest.fixture
def app() -> Iterator[Upstream]:
    up = Upstream("app")
    yield up
    up.kill()


def _shim(etcd_server, mesh: Mesh, name: str, app_port: int) -> tuple[ShimProcess, int]:
    """The shim and its inbound port (picked by the harness: again if another process takes
    it before the shim listens)."""
    shim = ShimProcess(etcd_server.endpoint, mesh.layout.prefix, "--service", name,
                       "--app-port", str(app_port), "--health", "tcp", "--tracing", "on",
                       wait="/ready", free_ports=("--inbound-port",))
    return shim, shim.ports["--inbound-port"]


def test_inbound_port_runs_the_server_middleware(etcd_server, mesh, app):
    name = f"inb-{uuid.uuid4().hex[:6]}"
    shim, inbound = _shim(etcd_server, mesh, name, app.port)
    with shim, \
            Mesh(etcd_server.endpoint, prefix=mesh.layout.prefix, service="caller-a",
                 handle_sigterm=False) as caller:
        (ep,) = caller.wait_for(name).endpoints
        assert ep.port == inbound  # callers come through the inbound port
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        with caller.http_client() as client:
            r = client.get(f"http://{name}/hello", headers={
                "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
            assert r.status_code == 200 and r.text == "app"
            got = app.received[-1]
            assert got.path == "/hello" and got.headers["x-mesh-caller"] == "caller-a"
            assert got.headers["traceparent"].split("-")[1] == trace_id
            assert got.headers["traceparent"].split("-")[2] != "00f067aa0ba902b7"
            r = client.post(f"http://{name}/echo", content=b"x" * 100_000)
            assert r.status_code == 200 and app.received[-1].body == b"x" * 100_000

            # access policy of the app's service, live from etcd
            set_policy(mesh, name, {"access": {"allow": ["caller-b"]}})
            stop = time.monotonic() + 5
            while (r := client.get(f"http://{name}/secret")).status_code != 403:
                assert time.monotonic() < stop, "policy not applied by the shim in 5 s"
            assert r.json()["error"] == "access_denied" and r.json()["caller"] == "caller-a"
            denied_count = app.count
            assert client.get(f"http://{name}/secret").status_code == 403
            assert app.count == denied_count  # a denied request never reaches the app
        text = shim.admin("/metrics")[1].decode()
        series = [ln for ln in text.splitlines()
                  if ln.startswith("http_server_request_duration_seconds_count")]
        assert any('http_response_status_code="200"' in ln and 'meshlib_caller="caller-a"' in ln
                   for ln in series), series
        assert any('http_response_status_code="403"' in ln for ln in series), series


def test_inbound_deadline(etcd_server, mesh):
    slow = SimpleApp("slow", delay=1.0)
    name = f"dl-{uuid.uuid4().hex[:6]}"
    try:
        shim, inbound = _shim(etcd_server, mesh, name, slow.port)
        with shim:
            with httpx.Client(base_url=f"http://127.0.0.1:{inbound}", trust_env=False) as c:
                r = c.get("/x", headers={"x-mesh-timeout": "0S"})
                assert r.status_code == 504 and slow.count == 0  # expired on arrival
                r = c.get("/x", headers={"x-mesh-timeout": "200m"})
                assert r.status_code == 504 and r.json() == {"error": "deadline_exceeded"}
                assert r.elapsed.total_seconds() < 0.9  # cancelled, not waited out
    finally:
        slow.stop()
