"""The cost of mesh mTLS: per-call p50 with mTLS over the same call without it, and the rate of
new handshakes.

Setup: one throwaway etcd; a keep-alive HTTP/1.1 responder in a separate process (nginx when
installed, as in bench/http_overhead.py, else a small Python server) listening on two ports, one clear text and one TLS 1.3 with a mesh certificate (client certificate verified),
a blocking thread per connection on both (so the server's TLS is OpenSSL's C code, not asyncio's
pure-Python TLS protocol, which would dominate the measurement);
one grpcio server (in this process) with a clear-text and a TLS port
(``meshlib.server.tls.grpc_server_credentials``). Each port is registered as its own service
(``http-plain``/``http-tls``, ``grpc-plain``/``grpc-tls``; the TLS ones with ``tls: true`` and
``mtls.mode: strict``) and called through the same mesh client holding a mesh identity (from
``meshlib.identity.testing.TestCA``), so the only difference between the two variants is TLS on
a kept-alive connection (one HTTP connection, one gRPC channel per endpoint, reused across
calls). The two HTTP variants take turns in short batches (``harness.interleave``), then the
two gRPC ones: each ratio compares two variants that alternate, so neither always runs right
after the other protocol's batch (rotating four variants keeps their cyclic order).

Handshakes: ``n`` new TLS connections to the HTTP TLS port (TCP connect, TLS 1.3 handshake
with client certificate, SPIFFE ID check) through ``meshlib.http.backends.sync.connect``.

Last line: ``mtls http_ratio=<r> grpc_ratio=<r> handshakes_per_s=<n>`` (TLS p50 / clear p50).
Target: both ratios <= 1.10.

    python bench/mtls.py [--rounds 60] [--batch 50] [--handshakes 300]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import textwrap
import time
from concurrent import futures

import harness  # noqa: F401 - puts the checkout's meshlib first on sys.path
from harness import (
    Samples,
    etcd_server,
    interleave,
    print_paired,
    print_ratio_line,
    report,
    timed,
)
from upstream import _wait as wait_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import grpc  # noqa: E402
import httpx  # noqa: E402
from grpc_proto import meshtest_pb2 as pb  # noqa: E402
from grpc_proto import meshtest_pb2_grpc as pb_grpc  # noqa: E402

from meshlib import Mesh  # noqa: E402
from meshlib.http import MeshTransport  # noqa: E402
from meshlib.http.backends.sync import connect  # noqa: E402
from meshlib.identity import StaticIdentitySource  # noqa: E402
from meshlib.identity.testing import TestCA  # noqa: E402
from meshlib.server.tls import grpc_server_credentials  # noqa: E402
from meshlib.testing.process import free_port, make_temp_dir, reap, remove_temp_dir, spawn  # noqa: E402
from meshlib.tls import client_context  # noqa: E402

_RESPONDER = textwrap.dedent(
    """
    import socket, ssl, sys, threading
    RESP = b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\ncontent-type: text/plain\\r\\n\\r\\nok"
    def serve(conn, ctx):
        try:
            if ctx is not None:
                conn = ctx.wrap_socket(conn, server_side=True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\\r\\n\\r\\n" in buf:
                    _, buf = buf.split(b"\\r\\n\\r\\n", 1)
                    conn.sendall(RESP)
        except OSError:
            pass
        finally:
            conn.close()
    def listen(port, ctx):
        s = socket.create_server(("127.0.0.1", port), backlog=1024)
        while True:
            conn, _ = s.accept()
            threading.Thread(target=serve, args=(conn, ctx), daemon=True).start()
    plain, tls, d = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.num_tickets = 0
    ctx.load_verify_locations(d + "/bundle.pem")
    ctx.load_cert_chain(d + "/server.pem")
    threading.Thread(target=listen, args=(plain, None), daemon=True).start()
    listen(tls, ctx)
    """
)


_NGINX = textwrap.dedent(
    """
    worker_processes 1;
    daemon off;
    pid {d}/nginx.pid;
    error_log {d}/error.log;
    events {{ worker_connections 1024; }}
    http {{
        access_log off;
        keepalive_requests 1000000;
        client_body_temp_path {d};
        server {{
            listen 127.0.0.1:{plain} backlog=1024;
            location / {{ return 200 "ok"; }}
        }}
        server {{
            listen 127.0.0.1:{tls} ssl backlog=1024;
            ssl_protocols TLSv1.3;
            ssl_certificate {d}/server.pem;
            ssl_certificate_key {d}/server.pem;
            ssl_client_certificate {d}/bundle.pem;
            ssl_verify_client optional;
            ssl_session_tickets off;
            location / {{ return 200 "ok"; }}
        }}
    }}
    """
)


def _responder_argv(tmp: pathlib.Path, plain: int, tls: int) -> list[str]:
    """nginx when installed (a C server: the client's cost dominates, as in
    bench/http_overhead.py), else the threaded Python responder."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                    else None)
    if exe is None:
        return [sys.executable, "-c", _RESPONDER, str(plain), str(tls), str(tmp)]
    conf = tmp / "nginx.conf"
    conf.write_text(_NGINX.format(d=tmp, plain=plain, tls=tls))
    return [exe, "-c", str(conf), "-p", str(tmp)]


class _Servicer(pb_grpc.TestServiceServicer):
    def UnaryCall(self, request: object, context: object) -> object:
        return pb.SimpleResponse(server_id="x")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--handshakes", type=int, default=300)
    args = ap.parse_args()

    ca = TestCA()
    client_src = StaticIdentitySource(ca.issue("bench-client"))
    http_creds = ca.issue("http-tls")
    tmp = make_temp_dir("meshlib-bench-mtls-")
    (tmp / "server.pem").write_bytes(http_creds.cert_chain_pem + http_creds.private_key_pem)
    (tmp / "bundle.pem").write_bytes(ca.bundle_pem)
    plain_port, tls_port = free_port(), free_port()
    proc = spawn(_responder_argv(tmp, plain_port, tls_port), tmp / "responder.log")
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_TestServiceServicer_to_server(_Servicer(), server)
    g_plain = server.add_insecure_port("127.0.0.1:0")
    g_tls = server.add_secure_port(
        "127.0.0.1:0", grpc_server_credentials(StaticIdentitySource(ca.issue("grpc-tls"))))
    server.start()
    try:
        wait_port(plain_port, tmp / "responder.log")
        wait_port(tls_port, tmp / "responder.log")
        strict = json.dumps({"mtls": {"mode": "strict"}}).encode()
        with etcd_server() as etcd, Mesh(etcd.endpoint, prefix="/meshlib-bench/v1",
                                         handle_sigterm=False) as mesh:
            mesh.register("http-plain", plain_port)
            mesh.register("http-tls", tls_port, tls=True)
            mesh.register("grpc-plain", g_plain, protocol="grpc")
            mesh.register("grpc-tls", g_tls, protocol="grpc", tls=True)
            for svc in ("http-tls", "grpc-tls"):
                mesh.client.put(mesh.layout.policy_key(svc), strict)
            for svc in ("http-plain", "http-tls", "grpc-plain", "grpc-tls"):
                mesh.wait_for(svc, timeout=10)
            for svc in ("http-tls", "grpc-tls"):
                while mesh.snapshot(svc).policy.mtls.mode != "strict":
                    time.sleep(0.01)

            http = httpx.Client(transport=MeshTransport(mesh, identity=client_src),
                                trust_env=False)
            chans = {name: mesh.grpc_channel(name, identity=client_src)
                     for name in ("grpc-plain", "grpc-tls")}
            stubs = {name: pb_grpc.TestServiceStub(ch).UnaryCall for name, ch in chans.items()}
            req = pb.SimpleRequest()

            def http_call(url: str) -> object:
                def go() -> None:
                    r = http.get(url)
                    r.read()
                    assert r.status_code == 200
                return go

            runners = {
                "http-plain": lambda n: timed(http_call("http://http-plain/"), n),
                "http-tls": lambda n: timed(http_call("http://http-tls/"), n),
                "grpc-plain": lambda n: timed(lambda: stubs["grpc-plain"](req), n),
                "grpc-tls": lambda n: timed(lambda: stubs["grpc-tls"](req), n),
            }
            for run in runners.values():  # warm-up: connections, channels, code paths
                run(200)
            # Each pair alternates on its own: in one rotation of four variants every variant
            # always follows the same one (rotating keeps the cyclic order), and http-plain
            # always ran right after the gRPC batches, whose threads left the CPUs warm,
            # which made clear-text HTTP look up to 30 % faster than TLS HTTP.
            s = Samples(list(runners))
            for pair in (("http-plain", "http-tls"), ("grpc-plain", "grpc-tls")):
                part = interleave({n: runners[n] for n in pair}, rounds=args.rounds,
                                  batch=args.batch)
                for n in pair:
                    s[n] = part[n]
                s.rounds = ([{**old, **new} for old, new in zip(s.rounds, part.rounds,
                                                               strict=True)]
                            if s.rounds else part.rounds)
            opened = http._transport._pool.opened  # type: ignore[attr-defined]

            ctx = client_context(client_src.current())
            target = (ctx, "spiffe://meshlib.local/svc/http-tls")
            key = ("127.0.0.1", tls_port, target[1])
            t0 = time.perf_counter()
            for _ in range(args.handshakes):
                connect(key, 5.0, target).close()
            hs_per_s = args.handshakes / (time.perf_counter() - t0)
            http.close()
            for ch in chans.values():
                ch.close()
    finally:
        server.stop(0)
        reap(proc, term_timeout=5)
        remove_temp_dir(tmp)

    for name in ("http-plain", "http-tls", "grpc-plain", "grpc-tls"):
        report(name, s[name])
    print_paired(s, {"http": ("http-tls", "http-plain"), "grpc": ("grpc-tls", "grpc-plain")})
    print(f"HTTP connections opened for {sum(len(v) for v in s.values())} calls: {opened} "
          "(kept alive)")
    print(f"handshakes: {args.handshakes} new TLS connections, {hs_per_s:.0f}/s")
    print_ratio_line("mtls", {"http_ratio": s.ratio("http-tls", "http-plain"),
                              "grpc_ratio": s.ratio("grpc-tls", "grpc-plain"),
                              "handshakes_per_s": f"{hs_per_s:.0f}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
