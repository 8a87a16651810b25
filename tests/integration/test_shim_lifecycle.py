"""The shim's lifecycle: registration with health checks, readiness, drain, restarts.

Each test runs its own shim process against the session etcd (a fresh etcd where etcd is
stopped) and watches etcd through a library ``Mesh`` to see what callers see.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
import uuid

import pytest
from http_servers import Upstream, register, wait_endpoints
from shim_harness import HeldPort, ShimProcess, SimpleApp, exchange, split_response, status_of

from meshlib.mesh import Mesh
from meshlib.shim.config import ConfigError, load_config
from meshlib.testing.etcd import free_port


@pytest.fixture
def mmesh(mesh: Mesh) -> Mesh:
    return mesh


def _prefix(mesh: Mesh) -> str:
    return mesh.layout.prefix


FAST_HEALTH = ("--health-interval", "0.1", "--health-timeout", "0.5", "--health-failures", "2")


def test_registration_follows_the_health_check(etcd_server, mmesh):
    app = SimpleApp("app")
    name = f"app-{uuid.uuid4().hex[:6]}"
    with ShimProcess(etcd_server.endpoint, _prefix(mmesh), "--service", name, "--app-port",
                     str(app.port), "--labels", "version=v2,team=a", "--zone", "z1",
                     *FAST_HEALTH, wait="/ready") as shim:
        snap = mmesh.wait_for(name)
        (ep,) = snap.endpoints
        assert (ep.port, ep.zone, ep.labels) == (app.port, "z1", {"version": "v2", "team": "a"})
        app.status = 503  # the health check fails: deregistered after 2 failures
        wait_endpoints(mmesh, name, 0)
        shim.wait_status("/ready", 503)
        assert "not registered" in shim.admin("/ready")[1].decode()
        app.status = 200  # passes again: registered again
        wait_endpoints(mmesh, name, 1)
        shim.wait_status("/ready", 200)
    app.stop()


def test_app_starting_late_and_restarting_behind_the_shim(etcd_server, mmesh):
    held = HeldPort()  # the app's port, kept from other processes until the app takes it
    port = held.port
    name = f"late-{uuid.uuid4().hex[:6]}"
    with held, ShimProcess(etcd_server.endpoint, _prefix(mmesh), "--service", name,
                           "--app-port", str(port), "--health", "tcp", *FAST_HEALTH) as shim:
        # /live answers before the shim's watch reaches etcd: wait until only the app is missing
        deadline = time.monotonic() + 10
        while True:
            status, body = shim.admin("/ready")
            missing = json.loads(body)["missing"]
            if not any(m.startswith("etcd not reachable") for m in missing):
                break
            assert time.monotonic() < deadline, f"the shim never reached etcd: {missing}"
            time.sleep(0.02)
        assert status == 503 and len(missing) == 1 and "not registered" in missing[0], missing
        assert mmesh.snapshot(name).endpoints == ()
        app = SimpleApp("late", port=port)  # the app comes up after its shim
        wait_endpoints(mmesh, name, 1)
        shim.wait_status("/ready", 200)
        with mmesh.http_client() as client:
            assert client.get(f"http://{name}/").text == "late"
            app.stop()  # the app restarts: gone from the mesh while it is down
            wait_endpoints(mmesh, name, 0)
            app.start()
            wait_endpoints(mmesh, name, 1)
            assert client.get(f"http://{name}/").text == "late"
        app.stop()


def test_sigterm_drains_without_failing_a_request(etcd_server, mmesh):
    """SIGTERM: deregister first, keep serving in-flight and new requests with
    ``Connection: close`` for the drain period, then exit 0."""
    slow = SimpleApp("slow", delay=0.6)
    slow_name = f"slow-{uuid.uuid4().hex[:6]}"
    mmesh.register(slow_name, slow.port, instance_id="slow")
    wait_endpoints(mmesh, slow_name, 1)
    app = SimpleApp("me")
    name = f"me-{uuid.uuid4().hex[:6]}"
    shim = ShimProcess(etcd_server.endpoint, _prefix(mmesh), "--service", name, "--app-port",
                       str(app.port), *FAST_HEALTH, wait="/ready", drain=1.5)
    try:
        wait_endpoints(mmesh, name, 1)
        req = f"GET /s HTTP/1.1\r\nHost: {slow_name}\r\n\r\n".encode()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            inflight = [pool.submit(exchange, shim.port, req) for _ in range(6)]
            deadline = time.monotonic() + 5
            while slow.count < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert slow.count == 6  # all six are in flight at the slow service
            t0 = time.monotonic()
            shim.proc.send_signal(15)
            wait_endpoints(mmesh, name, 0, timeout=2)  # deregistered first
            during = exchange(shim.port, req)  # a new request during the drain is served
            results = [f.result(timeout=10) for f in inflight] + [during]
        for r in results:
            status, headers, body = split_response(r)
            assert (status, body) == (200, b"slow")
            assert headers["connection"] == "close"
        assert shim.proc.wait(10) == 0
        assert time.monotonic() - t0 >= 1.4  # the drain period was kept
    finally:
        shim.close()
        slow.stop()
        app.stop()


def test_post_shutdown_for_batch_jobs(etcd_server, mmesh):
    app = SimpleApp("job")
    name = f"job-{uuid.uuid4().hex[:6]}"
    shim = ShimProcess(etcd_server.endpoint, _prefix(mmesh), "--service", name, "--app-port",
                       str(app.port), "--health", "none", wait="/ready", drain=0.2)
    try:
        wait_endpoints(mmesh, name, 1)
        assert shim.admin("/shutdown", method="GET")[0] == 405
        status, body = shim.admin("/shutdown", method="POST")
        assert status == 202 and json.loads(body)["status"] == "draining"
        assert shim.proc.wait(10) == 0
        wait_endpoints(mmesh, name, 0)
    finally:
        shim.close()
        app.stop()


def test_wait_holds_the_app_until_ready(etcd_server, mmesh):
    held = HeldPort()  # the shim's admin port, kept from other processes until the shim starts
    admin = held.port
    waiter = subprocess.Popen(
        [sys.executable, "-m", "meshlib.cli", "await", "--admin-port", str(admin),
         "--wait-timeout", "20", "--", sys.executable, "-c", "print('app started')"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        assert waiter.poll() is None  # no shim yet: still waiting
        with ShimProcess(etcd_server.endpoint, _prefix(mmesh), admin_port=admin, wait="/ready"):
            out, _ = waiter.communicate(timeout=20)
        assert waiter.returncode == 0 and out.strip().endswith(b"app started")
    finally:
        held.close()
        if waiter.poll() is None:
            waiter.kill()
    nobody = subprocess.run(
        [sys.executable, "-m", "meshlib.shim", "--wait", "--admin-port", str(free_port()),
         "--wait-timeout", "0.3"], capture_output=True, text=True, timeout=20)
    assert nobody.returncode == 1 and "not ready after 0.3s" in nobody.stderr


def test_restart_while_etcd_is_down_routes_from_the_snapshot(etcd, tmp_path):
    up = Upstream("snap")
    prefix = "/meshlib/v1"
    snapshot = str(tmp_path / "mesh.json")
    endpoint = etcd.endpoint
    req = b"GET /x HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"
    with Mesh(endpoint, prefix=prefix, handle_sigterm=False) as m:
        register(m, "orders", up, ttl=60)
        wait_endpoints(m, "orders", 1)
        with ShimProcess(endpoint, prefix, "--snapshot", snapshot) as shim:
            assert status_of(exchange(shim.port, req)) == 200  # learns of orders; file written
            assert shim.terminate() == 0
    etcd.stop()
    with ShimProcess(endpoint, prefix, "--snapshot", snapshot, wait="/ready") as shim:
        assert shim.admin_json("/config")["etcd_connected"] is False
        response = exchange(shim.port, req)
        assert split_response(response)[:3:2] == (200, b"snap")
    up.kill()


def test_bad_configuration_stops_the_shim_naming_the_flag(tmp_path):
    cases = [
        (["--port", "70000"], {}, "--port: bad value '70000'"),
        (["--health", "icmp"], {}, "--health: bad value 'icmp'"),
        ([], {"MESHLIB_SHIM_DRAIN_SECONDS": "soon"}, "MESHLIB_SHIM_DRAIN_SECONDS: bad value"),
        (["--app-port", "8080"], {}, "--app-port 8080: needs --service"),
        (["--port", "15001", "--admin-port", "15001"], {}, "--admin-port: port 15001 is already"),
        (["--upstream", "Orders=15101"], {}, "--upstream: bad value 'Orders=15101'"),
    ]
    for argv, env, message in cases:
        with pytest.raises(ConfigError) as err:
            load_config(argv, env)
        assert message in str(err.value), (argv, env, str(err.value))
    cfg_file = tmp_path / "shim.yaml"
    cfg_file.write_text("admin_port: 15999\nlabels: {version: v3}\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"shim.yaml: unknown key 'bogus'"):
        load_config(["--config", str(cfg_file)], {})
    cfg_file.write_text("admin_port: 15999\nlabels: {version: v3}\nmax_body_bytes: 2M\n")
    cfg, _ = load_config(["--config", str(cfg_file)], {"MESHLIB_SHIM_ADMIN_PORT": "15998"})
    assert (cfg.admin_port, dict(cfg.labels), cfg.max_body_bytes) == (15998, {"version": "v3"},
                                                                       2 * 1024 * 1024)
    # a port that is taken: the process exits 2 naming the flag
    taken = ShimProcess("127.0.0.1:1", "/p", wait="/live")
    try:
        res = subprocess.run([sys.executable, "-m", "meshlib.shim", "--etcd", "127.0.0.1:1",
                              "--port", str(taken.port), "--admin-port", str(free_port())],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and f"--port {taken.port}: cannot listen" in res.stderr
    finally:
        taken.close()



def test_grpc_app_registered_by_grpc_health_and_called_through_an_upstream_listener(
        etcd_server, mmesh):
    """A gRPC app: registered once grpc.health.v1 says SERVING, deregistered when it says
    NOT_SERVING; an ``--upstream`` listener of the same shim reaches it; the shim drains and
    stops the listener on SIGTERM."""
    from concurrent import futures

    import grpc

    from meshlib.grpc.health import add_health_servicer

    serving = {"status": 1}
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])

    class AnyMethod(grpc.GenericRpcHandler):
        def service(self, details):  # noqa: ANN001
            if details.method.startswith("/grpc.health"):
                return None
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"pong:" + req)

    add_health_servicer(server, lambda _svc: serving["status"])
    server.add_generic_rpc_handlers((AnyMethod(),))
    app_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    name = f"grpc-{uuid.uuid4().hex[:6]}"
    upstream = f"--upstream {name}={{}}"  # the harness picks the port
    shim = ShimProcess(etcd_server.endpoint, _prefix(mmesh), "--service", name, "--app-port",
                       str(app_port), "--protocol", "grpc", *FAST_HEALTH, wait="/ready",
                       drain=0.3, free_ports=(upstream,))
    listener = shim.ports[upstream]
    try:
        (ep,) = mmesh.wait_for(name).endpoints
        assert ep.protocol == "grpc"
        with grpc.insecure_channel(f"127.0.0.1:{listener}",
                                   options=[("grpc.enable_http_proxy", 0)]) as ch:
            assert ch.unary_unary("/demo.Ping/Ping")(b"x", timeout=5) == b"pong:x"
        ups = shim.admin_json("/config")["upstreams"]
        assert [(u["service"], u["port"]) for u in ups] == [(name, listener)]
        serving["status"] = 2  # NOT_SERVING
        wait_endpoints(mmesh, name, 0)
        serving["status"] = 1
        wait_endpoints(mmesh, name, 1)
        assert shim.terminate() == 0
    finally:
        shim.close()
        server.stop(0)


def test_request_body_stalling_mid_forward(etcd_server, mmesh):
    """A streamed body (over --retry-body-bytes) that stalls after reaching the endpoint:
    the app gets 408, the endpoint's connection is dropped (it never sees a whole request)."""
    up = Upstream("partial")
    name = f"stall-{uuid.uuid4().hex[:6]}"
    register(mmesh, name, up)
    wait_endpoints(mmesh, name, 1)
    try:
        with ShimProcess(etcd_server.endpoint, _prefix(mmesh), "--retry-body-bytes", "1K",
                         "--client-idle-timeout", "0.5") as shim:
            import socket

            with socket.create_connection(("127.0.0.1", shim.port), timeout=5) as s:
                s.sendall(f"POST /big HTTP/1.1\r\nHost: {name}\r\nContent-Length: 10000\r\n\r\n"
                          .encode() + b"x" * 3000)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            status, headers, body = split_response(data)
            assert status == 408 and b"no request body bytes" in body
            # the endpoint saw the connection end before the body did (never a whole request)
            assert all(len(r.body) < 10000 for r in up.received)
            text = shim.admin("/metrics")[1].decode()
            assert 'error_type="meshlib.shim.outbound.ClientBodyError"' in text
    finally:
        up.kill()


def test_second_signal_ends_the_drain(etcd_server, mmesh):
    shim = ShimProcess(etcd_server.endpoint, _prefix(mmesh), drain=30)
    try:
        shim.proc.send_signal(15)
        shim.wait_status("/ready", 503)  # draining
        t0 = time.monotonic()
        shim.proc.send_signal(2)  # Ctrl-C while draining: stop now
        assert shim.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        shim.close()
