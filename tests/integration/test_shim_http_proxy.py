"""The shim's outbound HTTP proxy against a real etcd, real upstreams and a real shim process.

One shim process serves the whole module (start-up costs ~1 s); each test registers its own
service names under the module's prefix. Requests go over raw sockets or plain ``httpx``
clients with ``trust_env=False`` (the shim is reached directly or as an explicit proxy).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from http_servers import Upstream, register, set_policy, wait_endpoints
from shim_harness import RawUpstream, ShimProcess, exchange, split_response, status_of

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
    with ShimProcess(etcd_server.endpoint, prefix, "--max-body-bytes", "8M") as s:
        yield s


@pytest.fixture
def ups() -> Iterator[list[Upstream]]:
    made: list[Upstream] = []
    yield made
    for u in made:
        u.kill()


def _service(mmesh: Mesh, ups: list[Upstream], n: int = 1, **kw) -> tuple[str, list[Upstream]]:
    name = f"svc-{uuid.uuid4().hex[:8]}"
    mine = []
    for i in range(n):
        up = Upstream(f"{name}-{i}", **kw)
        ups.append(up)
        mine.append(up)
        register(mmesh, name, up)
    wait_endpoints(mmesh, name, n)
    return name, mine


def test_host_routing_and_absolute_form(shim, mmesh, ups):
    name, (up,) = _service(mmesh, ups)
    r1 = exchange(shim.port, f"GET /a?x=1 HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                  .encode())
    r2 = exchange(shim.port, f"GET http://{name}/b HTTP/1.1\r\nHost: ignored\r\n"
                  "Connection: close\r\n\r\n".encode())
    assert split_response(r1)[0] == 200 and split_response(r1)[2] == up.name.encode()
    assert status_of(r2) == 200
    assert [(r.path, r.headers["host"]) for r in up.received] == [("/a?x=1", name), ("/b", name)]


def test_http_proxy_env_style_client(shim, mmesh, ups):
    """What HTTP_PROXY clients do: absolute-form requests to the proxy, keep-alive."""
    name, (up,) = _service(mmesh, ups)
    with httpx.Client(proxy=f"http://127.0.0.1:{shim.port}", trust_env=False) as client:
        rs = [client.get(f"http://{name}/p/{i}") for i in range(5)]
    assert [r.status_code for r in rs] == [200] * 5
    assert [r.path for r in up.received] == [f"/p/{i}" for i in range(5)]


def test_keep_alive_on_both_sides(shim, mmesh):
    raw = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close=False)
    name = f"svc-{uuid.uuid4().hex[:8]}"
    mmesh.register(name, raw.port, instance_id="raw")
    wait_endpoints(mmesh, name, 1)
    try:
        with socket.create_connection(("127.0.0.1", shim.port)) as s:
            f = s.makefile("rb")
            for i in range(3):
                s.sendall(f"GET /k{i} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
                line = f.readline()
                assert line.startswith(b"HTTP/1.1 200"), line
                length = 0
                while (h := f.readline()) != b"\r\n":
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":")[1])
                assert f.read(length) == b"ok"
        # one client connection, one upstream connection, three requests
        assert raw.count == 3 and raw.connections == 1
        assert [h.split(b" ")[1] for h in raw.heads] == [b"/k0", b"/k1", b"/k2"]
    finally:
        raw.stop()


def test_streaming_bodies_both_ways(shim, mmesh, ups):
    """A 3 MiB upload streams (chunked, not kept: never retried); a 3 MiB download streams."""
    big = Upstream("big")
    ups.append(big)
    name = f"svc-{uuid.uuid4().hex[:8]}"
    register(mmesh, name, big)
    wait_endpoints(mmesh, name, 1)
    payload = bytes(range(256)) * (3 * 4096)

    def gen() -> Iterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    with httpx.Client(base_url=f"http://127.0.0.1:{shim.port}", headers={"host": name},
                      trust_env=False, timeout=20) as client:
        r = client.post("/upload", content=gen())
        assert r.status_code == 200
        assert big.received[-1].body == payload
        assert big.received[-1].chunked
        r = client.post("/fixed", content=payload)
        assert r.status_code == 200
        assert big.received[-1].body == payload and not big.received[-1].chunked


def test_deadline_header_in_and_out(shim, mmesh, ups):
    name, (up,) = _service(mmesh, ups)
    r = exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nx-mesh-timeout: 2S\r\n"
                 "Connection: close\r\n\r\n".encode())
    assert status_of(r) == 200
    sent = up.received[-1].headers["x-mesh-timeout"]
    assert sent != "2S" and sent[-1] in "mu"  # the remaining time, re-encoded
    value = int(sent[:-1]) / (1000 if sent[-1] == "m" else 1_000_000)
    assert 1.0 < value <= 2.0
    # already expired on arrival: 504, nothing forwarded
    before = up.count
    r = exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nx-mesh-timeout: 0S\r\n"
                 "Connection: close\r\n\r\n".encode())
    status, headers, _ = split_response(r)
    assert (status, headers["x-mesh-error"]) == (504, "deadline_exceeded") and up.count == before


def test_retries_follow_the_policy(shim, mmesh, ups):
    """GET retried to the healthy instance; POST without an idempotency key not retried."""
    name, (bad, good) = _service(mmesh, ups, 2)
    bad.mode = "503"
    set_policy(mmesh, name, {"load_balancer": {"policy": "round_robin"},
                             "retries": {"attempts": 3, "retry_on": ["5xx"]}})
    for _ in range(4):
        r = exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                     .encode())
        assert split_response(r)[0] == 200 and split_response(r)[2] == good.name.encode()
    statuses = []
    for _ in range(4):
        r = exchange(shim.port, f"POST /p HTTP/1.1\r\nHost: {name}\r\nContent-Length: 2\r\n"
                     "Connection: close\r\n\r\nhi".encode())
        statuses.append(status_of(r))
    assert 503 in statuses  # passed through, not retried
    posts = [r for r in bad.received + good.received if r.method == "POST"]
    assert len(posts) == 4


def test_no_endpoints_and_unknown_service(shim, mmesh, ups):
    name, (up,) = _service(mmesh, ups)
    set_policy(mmesh, name, {"timeout": "1s"})
    up.kill()
    mmesh.client.delete(mmesh.layout.instance_key(name, up.name))
    wait_endpoints(mmesh, name, 0)
    deadline = time.monotonic() + 5
    while True:  # the shim's own watch sees the deletion shortly after ours
        r = exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                     .encode())
        if status_of(r) == 503 or time.monotonic() > deadline:
            break
    status, headers, body = split_response(r)
    assert status == 503 and headers["x-mesh-error"] == "no_endpoints", r
    r = exchange(shim.port, b"GET / HTTP/1.1\r\nHost: no-such-service\r\nConnection: close\r\n\r\n")
    status, headers, body = split_response(r)
    assert status == 404 and headers["x-mesh-refused"] == "unknown_service"
    assert b"no-such-service" in body


def test_metrics_use_the_library_families(shim, mmesh, ups):
    name, (up,) = _service(mmesh, ups)
    exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
    status, text = shim.admin("/metrics")
    assert status == 200
    lines = [ln for ln in text.decode().splitlines() if f'server_address="{name}"' in ln]
    assert any(ln.startswith("http_client_request_duration_seconds_bucket") for ln in lines)
    assert any('http_response_status_code="200"' in ln for ln in lines)


def test_config_shows_destinations(shim, mmesh, ups):
    name, (up,) = _service(mmesh, ups)
    exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
    doc = shim.admin_json("/config")
    eps = doc["destinations"][name]["endpoints"]
    assert [(e["port"], e["breaker"], e["ejected"]) for e in eps] == [(up.port, "closed", False)]
    assert doc["config"]["port"] == shim.port
    assert json.dumps(doc)  # JSON all the way down


def test_many_concurrent_requests(shim, mmesh, ups):
    name, _ = _service(mmesh, ups, 2)
    errors: list[object] = []

    def worker() -> None:
        with httpx.Client(proxy=f"http://127.0.0.1:{shim.port}", trust_env=False) as c:
            for i in range(25):
                r = c.get(f"http://{name}/c{i}")
                if r.status_code != 200:
                    errors.append(r.status_code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_trace_context_passes_through_unchanged_by_default(shim, mmesh, ups):
    """``--tracing passthrough`` (the default): a non-participating intermediary."""
    name, (up,) = _service(mmesh, ups)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\ntraceparent: {tp}\r\n"
             "tracestate: a=1\r\nConnection: close\r\n\r\n".encode())
    got = up.received[-1].headers
    assert (got["traceparent"], got["tracestate"]) == (tp, "a=1")


def _series(text: str, family: str, service: str) -> dict[str, set[str]]:
    """label name -> values of ``family`` samples for ``service`` in an exposition."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line.startswith(family + "{") or f'server_address="{service}"' not in line:
            continue
        labels = line[len(family) + 1:line.index("}")]
        for part in labels.split('",'):
            k, _, v = part.partition('="')
            out.setdefault(k, set()).add(v.rstrip('"'))
    return out


def test_shim_and_library_expose_identical_series(shim, mmesh, ups):
    """The same call through the library and through the shim: same families, label names,
    label values and histogram buckets."""
    from prometheus_client import REGISTRY, generate_latest

    name, (up,) = _service(mmesh, ups)
    with mmesh.http_client() as client:
        assert client.get(f"http://{name}/m").status_code == 200
    assert status_of(exchange(shim.port, f"GET /m HTTP/1.1\r\nHost: {name}\r\n"
                              "Connection: close\r\n\r\n".encode())) == 200
    lib = generate_latest(REGISTRY).decode()
    via_shim = shim.admin("/metrics")[1].decode()
    for family in ("http_client_request_duration_seconds_bucket",
                   "meshlib_client_attempt_duration_seconds_bucket"):
        a, b = _series(lib, family, name), _series(via_shim, family, name)
        assert a and a == b, (family, a, b)


def test_pipelined_requests_answered_in_order(shim, mmesh, ups):
    name, (up,) = _service(mmesh, ups)
    both = (f"GET /p1 HTTP/1.1\r\nHost: {name}\r\n\r\n"
            f"GET /p2 HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").encode()
    response = exchange(shim.port, both)
    assert response.count(b"HTTP/1.1 200 OK") == 2
    assert [r.path for r in up.received] == ["/p1", "/p2"]


def test_expect_100_continue(shim, mmesh, ups):
    name, (up,) = _service(mmesh, ups)
    with socket.create_connection(("127.0.0.1", shim.port), timeout=5) as s:
        s.sendall(f"POST /e HTTP/1.1\r\nHost: {name}\r\nContent-Length: 5\r\n"
                  "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        interim = s.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    assert status_of(rest) == 200
    assert up.received[-1].body == b"hello" and "expect" not in up.received[-1].headers


def test_http10_client(shim, mmesh, ups):
    """HTTP/1.0: no Host needed in absolute form; keep-alive only when asked for."""
    name, (up,) = _service(mmesh, ups)
    response = exchange(shim.port, f"GET http://{name}/old HTTP/1.0\r\n\r\n".encode())
    status, headers, body = split_response(response)
    assert (status, body, headers.get("connection")) == (200, up.name.encode(), "close")
    assert up.received[-1].path == "/old"


def test_config_shows_an_open_breaker(shim, mmesh, ups):
    name, (up,) = _service(mmesh, ups)
    up.mode = "503"
    set_policy(mmesh, name, {"retries": {"attempts": 1},
                             "circuit_breaker": {"failure_threshold": 2, "reset_timeout": "30s"}})
    req = f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
    stop = time.monotonic() + 5
    status, headers, _ = split_response(exchange(shim.port, req))
    while headers.get("x-mesh-error") != "circuit_open":  # 503s from the instance open it
        assert time.monotonic() < stop, headers
        status, headers, _ = split_response(exchange(shim.port, req))
    assert status == 503
    failed_before_open = up.count
    exchange(shim.port, req)
    assert up.count == failed_before_open  # failing fast: not sent
    (ep,) = shim.admin_json("/config")["destinations"][name]["endpoints"]
    assert ep["breaker"] == "open"
