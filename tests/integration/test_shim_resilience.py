"""Failures behind the shim: killed instances, resets after a POST was read, idle connections
closed under a request, and trace continuity through the shim as a hop."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from http_servers import Upstream, register, wait_endpoints
from shim_harness import RacingUpstream, ShimProcess, exchange, split_response, status_of

from meshlib.mesh import Mesh


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"/meshlib-test/{uuid.uuid4().hex}/v1"


@pytest.fixture(scope="module")
def mmesh(etcd_server, prefix) -> Iterator[Mesh]:
    with Mesh(etcd_server.endpoint, prefix=prefix, handle_sigterm=False) as m:
        yield m


@pytest.fixture(scope="module")
def shim(etcd_server, prefix) -> Iterator[ShimProcess]:
    with ShimProcess(etcd_server.endpoint, prefix, "--tracing", "on") as s:
        yield s


def _name(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:6]}"


def test_instance_killed_mid_traffic_fails_no_idempotent_request(shim, mmesh):
    name = _name("kill")
    ups = [Upstream(f"{name}-{i}") for i in range(3)]
    for up in ups:
        register(mmesh, name, up)
    wait_endpoints(mmesh, name, 3)
    failures: list[object] = []
    done = threading.Event()
    total = [0]

    def caller() -> None:
        with httpx.Client(proxy=f"http://127.0.0.1:{shim.port}", trust_env=False,
                          timeout=10) as c:
            while not done.is_set():
                try:
                    r = c.get(f"http://{name}/k")
                    if r.status_code != 200:
                        failures.append((r.status_code, r.text))
                except httpx.HTTPError as exc:
                    failures.append(exc)
                total[0] += 1

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while ups[0].count < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        ups[0].kill()  # crash: refuses connections, drops open ones; still in etcd
        killed_at = total[0]
        while total[0] < killed_at + 200 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        for t in threads:
            t.join()
        for up in ups:
            up.kill()
    assert total[0] >= killed_at + 200
    assert failures == []


def test_post_reset_after_read_reaches_the_app_once(shim, mmesh):
    """An instance that reads a POST and resets: 502, and the POST arrived exactly once
    (never retried elsewhere: it is not idempotent), even on a reused connection."""
    name = _name("reset")
    bad, other = Upstream(f"{name}-bad"), Upstream(f"{name}-other")
    register(mmesh, name, bad)
    register(mmesh, name, other)
    wait_endpoints(mmesh, name, 2)
    try:
        other.kill()  # leave one live instance to make the pick deterministic
        mmesh.client.delete(mmesh.layout.instance_key(name, other.name))
        wait_endpoints(mmesh, name, 1)
        req = f"GET /warm HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
        deadline = time.monotonic() + 5
        while status_of(exchange(shim.port, req)) != 200 and time.monotonic() < deadline:
            pass  # until the shim's watch has dropped the deleted instance
        bad.mode = "close"
        response = exchange(shim.port, f"POST /pay HTTP/1.1\r\nHost: {name}\r\n"
                            "Content-Length: 3\r\nConnection: close\r\n\r\n$10".encode())
        assert status_of(response) == 502
        posts = [r for r in bad.received if r.method == "POST"]
        assert [(p.path, p.body) for p in posts] == [("/pay", b"$10")]
    finally:
        bad.kill()


def test_reused_idle_connection_closed_under_a_get_is_retried_once(shim, mmesh):
    racer = RacingUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    name = _name("race")
    mmesh.register(name, racer.port, instance_id="racer")
    wait_endpoints(mmesh, name, 1)
    try:
        with httpx.Client(proxy=f"http://127.0.0.1:{shim.port}", trust_env=False) as c:
            assert c.get(f"http://{name}/1").text == "ok"  # conn A answered, kept idle
            assert c.get(f"http://{name}/2").text == "ok"  # A closed under it; retried on B
            # a POST in the same race is not resent: the server may have acted on it
            r = c.post(f"http://{name}/3", content=b"x")
            assert r.status_code == 502
        paths = [h.split(b" ")[1] for h in racer.heads]
        assert paths == [b"/1", b"/2", b"/2", b"/3"]
        assert racer.connections == 2
    finally:
        racer.stop()


def test_trace_continues_through_the_shim(shim, mmesh):
    """trace id kept, parent id changed (the shim's own span), tracestate carried."""
    name = _name("trace")
    up = Upstream(name)
    register(mmesh, name, up)
    wait_endpoints(mmesh, name, 1)
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = "00f067aa0ba902b7"
        response = exchange(shim.port, (
            f"GET /t HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n"
            f"traceparent: 00-{trace_id}-{parent}-01\r\ntracestate: vendor=abc,other=1\r\n\r\n"
        ).encode())
        assert split_response(response)[0] == 200
        got = up.received[-1].headers
        version, tid, pid, flags = got["traceparent"].split("-")
        assert (version, tid, flags) == ("00", trace_id, "01")
        assert pid != parent and len(pid) == 16
        assert got["tracestate"] == "vendor=abc,other=1"
    finally:
        up.kill()


def test_hedged_get_through_the_shim(shim, mmesh):
    """Policy hedging: the slow instance's copy loses to the hedge; the loser is cancelled."""
    from shim_harness import SimpleApp

    name = _name("hedge")
    slow, fast = SimpleApp("slow", delay=1.0), SimpleApp("fast")
    mmesh.register(name, slow.port, instance_id="slow")
    mmesh.register(name, fast.port, instance_id="fast")
    wait_endpoints(mmesh, name, 2)
    from http_servers import set_policy

    set_policy(mmesh, name, {"load_balancer": {"policy": "round_robin"},
                             "retries": {"hedging": {"enabled": True, "delay": "50ms"}}})
    try:
        with httpx.Client(proxy=f"http://127.0.0.1:{shim.port}", trust_env=False) as c:
            for _ in range(4):  # round robin: the first pick is the slow one at least twice
                t0 = time.monotonic()
                r = c.get(f"http://{name}/h")
                assert (r.status_code, r.text) == (200, "fast")
                assert time.monotonic() - t0 < 0.8
        assert slow.count >= 2  # the first copies went there and lost
    finally:
        slow.stop()
        fast.stop()


def test_fault_injection_abort_through_the_shim(shim, mmesh):
    name = _name("fault")
    up = Upstream(name)
    register(mmesh, name, up)
    wait_endpoints(mmesh, name, 1)
    from http_servers import set_policy

    set_policy(mmesh, name, {"fault": {"abort": {"percent": 100, "http_status": 418}}})
    try:
        deadline = time.monotonic() + 5
        while True:  # until the shim's watch has the policy
            r = exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close"
                         "\r\n\r\n".encode())
            if status_of(r) == 418 or time.monotonic() > deadline:
                break
        status, headers, body = split_response(r)
        assert status == 418 and headers["x-mesh-fault"] == "abort"
        before = up.count
        assert status_of(exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\n"
                                  "Connection: close\r\n\r\n".encode())) == 418
        assert up.count == before  # aborted calls are never sent
    finally:
        up.kill()


def test_app_going_away_cancels_the_forward(shim, mmesh):
    """The app closes its connection while the endpoint is still working: the shim drops the
    upstream connection at once instead of waiting for an answer nobody will read."""
    import socket as socket_mod

    from shim_harness import RawUpstream

    class Silent(RawUpstream):
        def __init__(self) -> None:
            self.closed_by_peer = threading.Event()
            super().__init__(b"")

        def _conn(self, conn: socket_mod.socket) -> None:
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                self.count += 1
                if conn.recv(65536) == b"":  # blocks until the shim closes its side
                    self.closed_by_peer.set()

    silent = Silent()
    name = _name("gone")
    mmesh.register(name, silent.port, instance_id="silent")
    wait_endpoints(mmesh, name, 1)
    try:
        s = socket_mod.create_connection(("127.0.0.1", shim.port), timeout=5)
        s.sendall(f"GET /slow HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        deadline = time.monotonic() + 5
        while silent.count == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert silent.count == 1
        s.close()  # the app gives up
        assert silent.closed_by_peer.wait(3)
    finally:
        silent.stop()
