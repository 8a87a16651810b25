"""The shim as an HTTP intermediary: framing, limits, SSRF refusals, hop-by-hop fields.

Every case is sent byte for byte over a raw socket to a real shim process; each asserts the
status the shim answered, that the connection was closed where RFC 9112 says so, and that
nothing reached the canary upstream (a real registered instance of the service named in the
request). After the bad request, a good one on a new connection reaches the canary, which
shows the canary was reachable all along.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest
from http_servers import Upstream, register, wait_endpoints
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
def trap() -> Iterator[RawUpstream]:
    """What HTTP_PROXY points at in the shim's environment: must never be used."""
    t = RawUpstream(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\n\r\n")
    yield t
    t.stop()


@pytest.fixture(scope="module")
def canary(mmesh) -> Iterator[Upstream]:
    up = Upstream("canary")
    register(mmesh, "canary", up)
    wait_endpoints(mmesh, "canary", 1)
    yield up
    up.kill()


@pytest.fixture(scope="module")
def shim(etcd_server, prefix, trap, canary) -> Iterator[ShimProcess]:
    proxy = f"http://127.0.0.1:{trap.port}"
    with ShimProcess(etcd_server.endpoint, prefix, "--max-body-bytes", "4K",
                     "--head-timeout", "0.5", "--client-idle-timeout", "1",
                     env={"HTTP_PROXY": proxy, "http_proxy": proxy}) as s:
        # warm up: the shim has resolved the canary service
        assert status_of(exchange(s.port, GOOD)) == 200
        yield s


GOOD = b"GET /good HTTP/1.1\r\nHost: canary\r\nConnection: close\r\n\r\n"


def _assert_nothing_forwarded(shim: ShimProcess, canary: Upstream, raw: bytes,
                              status: int) -> bytes:
    before = canary.count
    response = exchange(shim.port, raw)
    assert status_of(response) == status, response
    # the good request after it arrives; the bad one never did
    assert status_of(exchange(shim.port, GOOD)) == 200
    assert canary.count == before + 1
    assert canary.received[-1].path == "/good"
    return response


FRAMING = {
    "content-length and transfer-encoding":
        b"POST /x HTTP/1.1\r\nHost: canary\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "differing content-lengths":
        b"POST /x HTTP/1.1\r\nHost: canary\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "invalid content-length":
        b"POST /x HTTP/1.1\r\nHost: canary\r\nContent-Length: +3\r\n\r\nabc",
    "transfer-encoding not ending in chunked":
        b"POST /x HTTP/1.1\r\nHost: canary\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "chunked then gzip":
        b"POST /x HTTP/1.1\r\nHost: canary\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
    "transfer-encoding on HTTP/1.0":
        b"POST /x HTTP/1.0\r\nHost: canary\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold":
        b"GET /x HTTP/1.1\r\nHost: canary\r\nX-A: a\r\n b\r\n\r\n",
    "whitespace before colon":
        b"GET /x HTTP/1.1\r\nHost: canary\r\nX-A : a\r\n\r\n",
    "missing host":
        b"GET /x HTTP/1.1\r\nX-A: a\r\n\r\n",
    "repeated host":
        b"GET /x HTTP/1.1\r\nHost: canary\r\nHost: canary\r\n\r\n",
    "NUL in a field value":
        b"GET /x HTTP/1.1\r\nHost: canary\r\nX-A: a\x00b\r\n\r\n",
    "bare LF":
        b"GET /x HTTP/1.1\r\nHost: canary\nX-A: b\r\n\r\n",
    "bare CR":
        b"GET /x HTTP/1.1\r\nHost: canary\rX-A: b\r\n\r\n",
    "invalid chunk size":
        b"POST /x HTTP/1.1\r\nHost: canary\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "HTTP/0.9":
        b"GET /x\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(FRAMING))
def test_framing_rejected_with_400_and_close(shim, canary, case):
    response = _assert_nothing_forwarded(shim, canary, FRAMING[case], 400)
    if response.startswith(b"HTTP/1.1"):
        assert split_response(response)[1].get("connection") == "close"


def test_head_too_large_431(shim, canary):
    raw = b"GET /x HTTP/1.1\r\nHost: canary\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n"
    _assert_nothing_forwarded(shim, canary, raw, 431)


def test_too_many_fields_431(shim, canary):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(101))
    _assert_nothing_forwarded(shim, canary,
                              b"GET /x HTTP/1.1\r\nHost: canary\r\n" + fields + b"\r\n", 431)


def test_body_over_limit_413(shim, canary):
    _assert_nothing_forwarded(shim, canary, b"POST /x HTTP/1.1\r\nHost: canary\r\n"
                              b"Content-Length: 5000\r\n\r\n" + b"a" * 5000, 413)
    chunked = b"1000\r\n" + b"a" * 4096 + b"\r\n" + b"10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n"
    _assert_nothing_forwarded(shim, canary, b"POST /x HTTP/1.1\r\nHost: canary\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n" + chunked, 413)


def test_slowloris_head_closed(shim, canary):
    before = canary.count
    with socket.create_connection(("127.0.0.1", shim.port), timeout=5) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: canary\r\n")
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(65536):  # the shim answers 408 and closes (head timeout 0.5 s)
            data += chunk
        waited = time.monotonic() - t0
    assert status_of(data) == 408 and data.endswith(b"not received within 0.5s\n")
    assert 0.3 < waited < 3.0
    assert canary.count == before


SSRF = {
    "CONNECT": (b"CONNECT canary:80 HTTP/1.1\r\nHost: canary:80\r\n\r\n", 405),
    "IPv4 literal": (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 403),
    "metadata address": (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n", 403),
    "IPv6 literal": (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n", 403),
    "absolute IP": (b"GET http://10.0.0.1/x HTTP/1.1\r\nHost: canary\r\nConnection: close\r\n\r\n", 403),
    "decimal IP": (b"GET / HTTP/1.1\r\nHost: 2130706433\r\nConnection: close\r\n\r\n", 403),
    "dotted name": (b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n", 403),
    "localhost": (b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", 403),
    "https absolute form": (b"GET https://canary/x HTTP/1.1\r\nHost: canary\r\nConnection: close\r\n\r\n", 400),
    "unknown service": (b"GET / HTTP/1.1\r\nHost: nosuchservice\r\nConnection: close\r\n\r\n", 404),
}


@pytest.mark.parametrize("case", sorted(SSRF))
def test_destination_refused(shim, canary, case):
    raw, status = SSRF[case]
    response = _assert_nothing_forwarded(shim, canary, raw, status)
    assert split_response(response)[1].get("x-mesh-refused")


def test_own_port_refused(shim, canary):
    raw = (f"GET http://canary:{shim.port}/x HTTP/1.1\r\nHost: canary\r\n"
           "Connection: close\r\n\r\n").encode()
    response = _assert_nothing_forwarded(shim, canary, raw, 403)
    assert split_response(response)[1]["x-mesh-refused"] == "own_port"


def test_host_port_is_not_a_destination(shim, canary):
    """``Host: canary:<shim port>`` (how an app addressing the shim by name writes it) routes
    by name; only the absolute form names a destination port."""
    r = exchange(shim.port, f"GET /hp HTTP/1.1\r\nHost: canary:{shim.port}\r\n"
                 "Connection: close\r\n\r\n".encode())
    assert status_of(r) == 200 and canary.received[-1].path == "/hp"


def test_endpoint_on_the_shims_own_port_is_not_called(shim, mmesh):
    """An instance registered at the shim's own address and port would be a loop."""
    name = f"loop-{uuid.uuid4().hex[:6]}"
    mmesh.register(name, shim.port, instance_id="loop")
    wait_endpoints(mmesh, name, 1)
    r = exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                 .encode())
    status, headers, body = split_response(r)
    assert status == 503 and b"is this shim's own port" in body, r
    assert headers["x-mesh-error"] == "LoopError"


def test_never_through_http_proxy(shim, canary, trap):
    """The shim's environment has HTTP_PROXY pointing at the trap: it is never used."""
    assert status_of(exchange(shim.port, GOOD)) == 200
    assert trap.count == 0 and trap.connections == 0


def test_hop_by_hop_stripped_both_ways(shim, mmesh):
    raw = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-secret\r\n"
                      b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
                      b"X-Kept: k\r\n\r\nok", close=False)
    name = f"hop-{uuid.uuid4().hex[:6]}"
    mmesh.register(name, raw.port, instance_id="raw")
    wait_endpoints(mmesh, name, 1)
    try:
        response = exchange(shim.port, (
            f"GET /h HTTP/1.1\r\nHost: {name}\r\nConnection: close, X-Foo\r\nX-Foo: secret\r\n"
            "Keep-Alive: 5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
            "Trailer: X-T\r\nUpgrade: foo/1\r\nProxy-Authorization: Basic eA==\r\n"
            "X-Keep: yes\r\n\r\n").encode())
        status, headers, body = split_response(response)
        assert status == 200 and body == b"ok"
        assert headers["x-kept"] == "k"
        assert not {"x-secret", "keep-alive", "proxy-authenticate"} & set(headers)
        sent = raw.heads[-1].lower()
        for name_ in (b"x-foo", b"keep-alive", b"proxy-connection", b"\r\nte:", b"trailer",
                      b"upgrade", b"proxy-authorization"):
            assert name_ not in sent, (name_, sent)
        assert b"x-keep: yes" in sent
    finally:
        raw.stop()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 abc\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A : b\r\n\r\n",
])
def test_malformed_upstream_response_502(shim, mmesh, reply):
    raw = RawUpstream(reply)
    name = f"bad-{uuid.uuid4().hex[:6]}"
    mmesh.register(name, raw.port, instance_id="raw")
    wait_endpoints(mmesh, name, 1)
    try:
        response = exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\n"
                            "Connection: close\r\n\r\n".encode())
        assert status_of(response) == 502, response
        assert raw.count >= 1
    finally:
        raw.stop()


def _read_response(f, method: str) -> tuple[int, dict[str, str], bytes]:
    line = f.readline()
    status = int(line.split(b" ")[1])
    headers: dict[str, str] = {}
    while (h := f.readline()) != b"\r\n":
        k, _, v = h.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    assert headers.get("transfer-encoding") == "chunked", headers
    body = b""
    while True:
        size = int(f.readline().strip(), 16)
        if size == 0:
            f.readline()
            return status, headers, body
        body += f.read(size)
        f.readline()


def test_head_204_304_framed_on_a_kept_alive_connection(shim, mmesh):
    """Bodiless answers keep the connection usable: the next response parses correctly."""
    replies = {
        b"HEAD": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"/304": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        b"/get": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    }

    class Switch(RawUpstream):
        def _conn(self, conn: socket.socket) -> None:
            buf = b""
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                    while b"\r\n\r\n" in buf:
                        head, _, buf = buf.partition(b"\r\n\r\n")
                        self.count += 1
                        method, target = head.split(b" ")[:2]
                        conn.sendall(replies[b"HEAD" if method == b"HEAD" else target])

    up = Switch(b"")
    name = f"frame-{uuid.uuid4().hex[:6]}"
    mmesh.register(name, up.port, instance_id="raw")
    wait_endpoints(mmesh, name, 1)
    try:
        with socket.create_connection(("127.0.0.1", shim.port), timeout=5) as s:
            f = s.makefile("rb")
            for method, path in [("HEAD", "/h"), ("GET", "/204"), ("GET", "/304"),
                                 ("GET", "/get")]:
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
                status, headers, body = _read_response(f, method)
                if method == "HEAD":
                    assert (status, headers.get("content-length"), body) == (200, "100", b"")
                elif path == "/get":
                    assert (status, body) == (200, b"abc")
                else:
                    assert status == int(path[1:]) and body == b""
                    assert "transfer-encoding" not in headers
    finally:
        up.stop()


def test_refusals_are_counted(shim, canary):
    exchange(shim.port, b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
    exchange(shim.port, FRAMING["content-length and transfer-encoding"])
    text = shim.admin("/metrics")[1].decode()
    counts = {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines()
              if line.startswith("meshlib_shim_refused_requests_total{")}
    assert counts["ip_literal"] >= 1 and counts["bad_request"] >= 1
    assert 'meshlib_shim_connections{listener="outbound"}' in text


def test_stalled_request_body_408(shim, canary):
    before = canary.count
    with socket.create_connection(("127.0.0.1", shim.port), timeout=5) as s:
        s.sendall(b"POST /stall HTTP/1.1\r\nHost: canary\r\nContent-Length: 10\r\n\r\nabc")
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        waited = time.monotonic() - t0
    assert status_of(data) == 408 and b"no request body bytes for 1.0s" in data
    assert 0.8 < waited < 4.0
    assert canary.count == before


def test_slowloris_behind_a_pipelined_request(shim, canary):
    """A complete request followed, in the same packet, by the start of a head that never
    ends: the first is answered, then the head timeout closes the connection."""
    before = canary.count
    with socket.create_connection(("127.0.0.1", shim.port), timeout=5) as s:
        s.sendall(b"GET /first HTTP/1.1\r\nHost: canary\r\n\r\nGET /second HTTP/1.1\r\nHo")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 408 Request Timeout" in data
    assert canary.count == before + 1 and canary.received[-1].path == "/first"
