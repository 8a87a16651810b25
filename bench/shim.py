"""The sidecar's whole price: the shim against nginx and haproxy as proxies, side by side.

One run, one machine, the same upstream and the same load for every variant (issue 12, "Speed
and cost"):

* upstream: nginx answering a fixed body (Debian ``nginx-light``, 1 worker), registered in a
  throwaway etcd as mesh service ``bench-up``;
* variants: ``direct`` (the load generator talks to the upstream), ``nginx`` (reverse proxy,
  1 worker, upstream keep-alive), ``haproxy`` (1 thread, ``http-reuse always``) and ``shim``
  (``python -m meshlib.shim``, one process; the load sends ``Host: bench-up``);
* pinning: every proxy (and the shim) runs on the LAST allowed core; the upstream, the load
  generators and etcd on the first (on a 2-core machine: one core for the proxy under test,
  one for everything else);
* saturation throughput: ``wrk -t1 -c32`` for ``--seconds``; the variants take turns for
  ``--rounds`` rounds in rotated order (this machine drifts: see bench/harness.py) and each
  variant's BEST round is reported: neighbours on a shared machine only ever take throughput
  away (and add latency), so the best round is the closest to what the variant can do (the
  rule of ``timeit``); every round is printed;
* latency at a fixed 1000 req/s, open loop: ``h2load --h1 --rps`` (20 clients x 50 req/s,
  started 1 ms apart so that their timers do not fire in bursts of 20) with a per-request log, from which p50/p99 are computed (h2load prints no percentiles itself),
  in rounds like the throughput (best round: lowest p99); added p99 = shim's minus direct's;
* the shim's RSS (``VmRSS``) idle (started, a few warm-up requests, 1 s quiet) and the highest
  sample while serving 1000 req/s; its CPU seconds (``utime + stime``) per 1000 requests
  during the fixed-rate runs (best round);
* gRPC unary calls (empty message, ``h2load`` over h2c, 4 connections x 16 streams): direct to
  a grpcio upstream, through nginx ``grpc_pass`` and through the shim's upstream listener
  (``--upstream bench-grpc=PORT``), rounds as above.

Last line::

    shim throughput_vs_nginx=<r> added_p99_ms=<v> idle_rss_mb=<v> rss_1k_mb=<v> cpu_per_1k_req_s=<v> grpc_vs_nginx=<r>

Targets (issue 12): throughput >= 0.5 x nginx; added p99 (shim minus direct) <= 1 ms at
1000 req/s; idle RSS <= 40 MB and <= 60 MB at 1000 req/s; CPU <= 0.1 s per 1000 requests.

Tools come from Debian: ``apt-get install -y nginx-light haproxy wrk nghttp2-client``
(``h2load`` is in nghttp2-client); a missing tool stops the bench with that message.

    python bench/shim.py [--seconds 5] [--rounds 5] [--latency-seconds 5] [--grpc-calls 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from harness import ROOT, etcd_server, pct, print_ratio_line, rotations

from meshlib.testing.process import free_port, log_tail, make_temp_dir, reap, remove_temp_dir, spawn

TOOLS = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client",
         "taskset": "util-linux"}
HTTP_SERVICE = "bench-up"
GRPC_SERVICE = "bench-grpc"
BODY = "meshlib bench: a fixed body of 64 bytes from the upstream nginx.\n"[:64]
GRPC_METHOD = "/bench.Bench/Empty"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_GRPC_UPSTREAM = textwrap.dedent(
    """
    import asyncio, sys, grpc, grpc.aio
    class Any(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(self.empty)
        async def empty(self, request, context):
            return b""
    async def main():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((Any(),))
        server.add_insecure_port("127.0.0.1:" + sys.argv[1])
        await server.start()
        await server.wait_for_termination()
    asyncio.run(main())
    """
)


def missing_tools() -> list[str]:
    return [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items()
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def cores() -> tuple[int, int]:
    """(core for the load, upstream and etcd; core for the proxy under test)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[-1]


def wait_port(port: int, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}; log {log}:\n{log_tail(log)}")


# --------------------------------------------------------------------------- processes


class Proc:
    """A process pinned to ``core`` (``taskset`` execs, so ``pid`` is the program's own)."""

    def __init__(self, name: str, argv: list[str], core: int, workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.proc = spawn([tool("taskset"), "-c", str(core), *argv], self.log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError(f"{self.name}: no VmRSS")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{log_tail(self.log)}")

    def stop(self) -> None:
        reap(self.proc, term_timeout=5)


def nginx_conf(workdir: Path, name: str, server_block: str) -> list[str]:
    conf = workdir / f"{name}.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        pid {workdir}/{name}.pid;
        error_log {workdir}/{name}.error.log;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            keepalive_requests 1000000;
            client_body_temp_path {workdir}/{name}-body;
            proxy_temp_path {workdir}/{name}-proxy;
        """) + textwrap.indent(textwrap.dedent(server_block), "    ") + "}\n")
    return [tool("nginx"), "-c", str(conf), "-p", str(workdir)]


def start_http_upstream(workdir: Path, core: int) -> tuple[Proc, int]:
    port = free_port()
    argv = nginx_conf(workdir, "upstream", f"""
        server {{
            listen 127.0.0.1:{port} backlog=4096;
            location / {{ default_type text/plain; return 200 "{BODY}"; }}
        }}
    """)
    p = Proc("upstream", argv, core, workdir)
    wait_port(port, p.log)
    return p, port


def start_nginx_proxy(workdir: Path, core: int, upstream: int) -> tuple[Proc, int]:
    port = free_port()
    argv = nginx_conf(workdir, "nginx-proxy", f"""
        upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
        server {{
            listen 127.0.0.1:{port} backlog=4096;
            location / {{
                proxy_pass http://up;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
    """)
    p = Proc("nginx-proxy", argv, core, workdir)
    wait_port(port, p.log)
    return p, port


def start_haproxy(workdir: Path, core: int, upstream: int) -> tuple[Proc, int]:
    port = free_port()
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(textwrap.dedent(f"""
        global
            nbthread 1
            maxconn 8192
        defaults
            mode http
            timeout connect 5s
            timeout client 30s
            timeout server 30s
            http-reuse always
        frontend fe
            bind 127.0.0.1:{port}
            default_backend be
        backend be
            server up 127.0.0.1:{upstream}
    """))
    p = Proc("haproxy", [tool("haproxy"), "-f", str(cfg), "-db"], core, workdir)
    wait_port(port, p.log)
    return p, port


def start_grpc_upstream(workdir: Path, core: int) -> tuple[Proc, int]:
    port = free_port()
    p = Proc("grpc-upstream", [sys.executable, "-c", _GRPC_UPSTREAM, str(port)], core, workdir)
    wait_port(port, p.log)
    return p, port


def start_nginx_grpc(workdir: Path, core: int, upstream: int) -> tuple[Proc, int]:
    port = free_port()
    argv = nginx_conf(workdir, "nginx-grpc", f"""
        upstream grpcup {{ server 127.0.0.1:{upstream}; keepalive 64; }}
        server {{
            listen 127.0.0.1:{port} http2 backlog=4096;
            location / {{ grpc_pass grpc://grpcup; }}
        }}
    """)
    p = Proc("nginx-grpc", argv, core, workdir)
    wait_port(port, p.log)
    return p, port


def start_shim(workdir: Path, core: int, etcd: str, prefix: str,
               upstreams: tuple[str, ...] = ()) -> tuple[Proc, int, int, dict[str, int]]:
    """``python -m meshlib.shim`` (no registration of its own); returns the process, its HTTP
    port, admin port and the gRPC listener port per upstream service."""
    port, admin = free_port(), free_port()
    grpc_ports = {svc: free_port() for svc in upstreams}
    argv = [sys.executable, "-m", "meshlib.shim", "--etcd", etcd, "--prefix", prefix,
            "--port", str(port), "--admin-port", str(admin), "--log-level", "warning"]
    for svc, p in grpc_ports.items():
        argv += ["--upstream", f"{svc}={p}"]
    name = "shim-grpc" if upstreams else "shim"
    proc = Proc(name, argv, core, workdir)
    deadline = time.monotonic() + 30
    while True:
        proc.check()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"shim not ready in 30 s:\n{log_tail(proc.log)}")
        time.sleep(0.1)
    for p in grpc_ports.values():
        wait_port(p, proc.log)
    return proc, port, admin, grpc_ports


# --------------------------------------------------------------------------- load


def wrk(core: int, port: int, seconds: float, host: str | None) -> float:
    """Saturation throughput (req/s) with wrk, 1 thread, 32 connections."""
    argv = [tool("taskset"), "-c", str(core), tool("wrk"), "-t1", "-c32", f"-d{seconds:g}s"]
    if host:
        argv += ["-H", f"Host: {host}"]
    out = subprocess.run([*argv, f"http://127.0.0.1:{port}/"], capture_output=True,
                         text=True, timeout=seconds + 60).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk: {errors.group(1)} bad responses from port {port}:\n{out}")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{out}")
    return float(m.group(1))


def h2load_fixed_rate(core: int, port: int, seconds: float, host: str | None,
                      workdir: Path, rate: int = 1000, clients: int = 20
                      ) -> tuple[list[float], int]:
    """Open-loop HTTP/1.1 load at ``rate`` req/s; (latencies in ms, non-2xx count)."""
    log = workdir / f"h2load-{port}.log"
    log.unlink(missing_ok=True)
    # one connection per millisecond (-r 1 --rate-period 1ms), so the clients' timers are
    # spread over the period instead of firing together in bursts of `clients` requests
    argv = [tool("taskset"), "-c", str(core), tool("h2load"), "--h1", "-c", str(clients),
            "--rps", str(rate // clients), "-n", str(int(rate * seconds)), "-r", "1",
            "--rate-period", "1ms", "--log-file", str(log)]
    if host:  # h2load takes the Host of HTTP/1.1 requests from :authority (-H Host adds one)
        argv += ["-H", f":authority: {host}"]
    subprocess.run([*argv, f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                   timeout=seconds + 60, check=True)
    latencies, bad = [], 0
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            if not parts[1].startswith("2"):
                bad += 1
            latencies.append(int(parts[2]) / 1000.0)
    if not latencies or bad:
        raise RuntimeError(f"h2load against port {port}: {len(latencies)} requests, {bad} "
                           "not 2xx: the numbers would not be comparable")
    return latencies, bad


def h2load_grpc(core: int, port: int, requests: int, workdir: Path) -> float:
    """gRPC unary throughput (calls/s): empty message, 4 connections x 16 streams."""
    body = workdir / "grpc-empty.bin"
    body.write_bytes(b"\x00\x00\x00\x00\x00")  # uncompressed, length 0 (gRPC framing)
    argv = [tool("taskset"), "-c", str(core), tool("h2load"), "-n", str(requests), "-c", "4",
            "-m", "16", "-d", str(body), "-H", "content-type: application/grpc",
            "-H", "te: trailers", f"http://127.0.0.1:{port}{GRPC_METHOD}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300).stdout
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    if not m or not done or int(done.group(1)) != requests:
        raise RuntimeError(f"h2load gRPC run against {port} failed:\n{out}")
    return float(m.group(1))


def grpc_check(port: int) -> None:
    """One real gRPC call (status OK in the trailers, which h2load does not read)."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert ch.unary_unary(GRPC_METHOD)(b"", timeout=10) == b""


class Sampler:
    """Samples a process's RSS every 50 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.rss_mb())
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- the run


@contextmanager
def workspace() -> Iterator[Path]:
    d = make_temp_dir("meshlib-bench-shim-")
    try:
        yield d
    finally:
        remove_temp_dir(d)


def rounds_of(runners: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in runners}
    for order in rotations(list(runners), rounds):
        for name in order:
            out[name].append(runners[name]())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="wrk duration per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-seconds", type=float, default=5.0,
                    help="h2load duration per variant and round")
    ap.add_argument("--grpc-calls", type=int, default=5000, help="gRPC calls per round")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = ap.parse_args()
    missing = missing_tools()
    if missing:
        print("bench/shim.py needs " + ", ".join(missing) + ".\nOn Debian/Ubuntu (root): "
              "apt-get update && apt-get install -y nginx-light haproxy wrk nghttp2-client",
              file=sys.stderr)
        return 2
    load_core, proxy_core = cores()
    print(f"cores: load/upstream/etcd on {load_core}, proxy under test on {proxy_core}")
    if load_core == proxy_core:
        print("warning: one core only; the proxies share it with the load", file=sys.stderr)
    from meshlib import Mesh

    prefix = "/meshlib-bench-shim/v1"
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        work = stack.enter_context(workspace())
        etcd = stack.enter_context(etcd_server())
        mesh = stack.enter_context(Mesh(etcd.endpoint, prefix=prefix, handle_sigterm=False))
        up, up_port = start_http_upstream(work, load_core)
        stack.callback(up.stop)
        mesh.register(HTTP_SERVICE, up_port)
        mesh.wait_for(HTTP_SERVICE)
        ngx, ngx_port = start_nginx_proxy(work, proxy_core, up_port)
        stack.callback(ngx.stop)
        hap, hap_port = start_haproxy(work, proxy_core, up_port)
        stack.callback(hap.stop)
        shim, shim_port, _admin, _ = start_shim(work, proxy_core, etcd.endpoint, prefix)
        stack.callback(shim.stop)

        targets = {"direct": (up_port, None), "nginx": (ngx_port, None),
                   "haproxy": (hap_port, None), "shim": (shim_port, HTTP_SERVICE)}
        for name, (port, host) in targets.items():  # warm-up and a correctness check
            req = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                         headers={"Host": host} if host else {})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.read().decode() == BODY, f"{name}: wrong body"
        time.sleep(1.0)
        idle_rss = shim.rss_mb()
        print(f"shim idle RSS: {idle_rss:.1f} MB")

        tput = rounds_of({name: (lambda p=port, h=host: wrk(load_core, p, args.seconds, h))
                          for name, (port, host) in targets.items()}, args.rounds)
        print(f"\nHTTP/1.1 saturation (wrk -t1 -c32, {args.seconds:g} s x {args.rounds} rounds, "
              "best round):")
        for name, values in tput.items():
            print(f"  {name:8s} {max(values):9.0f} req/s   rounds: "
                  + ", ".join(f"{v:.0f}" for v in values))

        print(f"\nfixed 1000 req/s, open loop (h2load --h1 --rps, {args.latency_seconds:g} s x "
              f"{args.rounds} rounds, best round):")
        lat_rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        cpu_rounds: list[float] = []
        rss_1k = 0.0
        for order in rotations(list(targets), args.rounds):
            for name in order:
                port, host = targets[name]
                shim.check()
                cpu0 = shim.cpu_seconds()
                with Sampler(shim) as sampler:
                    ms, _bad = h2load_fixed_rate(load_core, port, args.latency_seconds, host,
                                                 work)
                if name == "shim":
                    rss_1k = max(rss_1k, sampler.peak)
                    cpu_rounds.append((shim.cpu_seconds() - cpu0) / (len(ms) / 1000.0))
                lat_rounds[name].append((pct(ms, 0.5), pct(ms, 0.99)))
        lat = {name: (min(r[0] for r in rounds), min(r[1] for r in rounds))
               for name, rounds in lat_rounds.items()}
        for name, rounds in lat_rounds.items():
            print(f"  {name:8s} p50 {lat[name][0]:6.3f} ms  p99 {lat[name][1]:6.3f} ms   "
                  "p99 rounds: " + ", ".join(f"{r[1]:.2f}" for r in rounds))
        added_p99 = lat["shim"][1] - lat["direct"][1]
        cpu_per_1k = min(cpu_rounds)
        print(f"shim RSS at 1000 req/s (highest sample): {rss_1k:.1f} MB; CPU "
              f"{cpu_per_1k:.3f} s per 1000 requests (best round)")
        shim.stop()

        # gRPC unary: direct vs nginx grpc_pass vs the shim's upstream listener
        gup, gup_port = start_grpc_upstream(work, load_core)
        stack.callback(gup.stop)
        mesh.register(GRPC_SERVICE, gup_port, protocol="grpc")
        mesh.wait_for(GRPC_SERVICE)
        gngx, gngx_port = start_nginx_grpc(work, proxy_core, gup_port)
        stack.callback(gngx.stop)
        gshim, _p, _a, gports = start_shim(work, proxy_core, etcd.endpoint, prefix,
                                           (GRPC_SERVICE,))
        stack.callback(gshim.stop)
        gtargets = {"direct": gup_port, "nginx": gngx_port, "shim": gports[GRPC_SERVICE]}
        for port in gtargets.values():
            grpc_check(port)
        gput = rounds_of({name: (lambda p=port: h2load_grpc(load_core, p, args.grpc_calls, work))
                          for name, port in gtargets.items()}, args.rounds)
        print(f"\ngRPC unary saturation (h2load h2c, 4 conns x 16 streams, {args.grpc_calls} "
              f"calls x {args.rounds} rounds, best round):")
        for name, values in gput.items():
            print(f"  {name:8s} {max(values):9.0f} calls/s   rounds: "
                  + ", ".join(f"{v:.0f}" for v in values))

    med = {k: max(v) for k, v in tput.items()}
    gmed = {k: max(v) for k, v in gput.items()}
    results = {
        "throughput_vs_nginx": med["shim"] / med["nginx"],
        "added_p99_ms": added_p99,
        "idle_rss_mb": idle_rss, "rss_1k_mb": rss_1k, "cpu_per_1k_req_s": cpu_per_1k,
        "grpc_vs_nginx": gmed["shim"] / gmed["nginx"],
        "http_req_s": med, "grpc_calls_s": gmed,
        "latency_ms": {k: {"p50": v[0], "p99": v[1]} for k, v in lat.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print()
    print_ratio_line("shim", {
        "throughput_vs_nginx": results["throughput_vs_nginx"],
        "added_p99_ms": results["added_p99_ms"],
        "idle_rss_mb": f"{idle_rss:.1f}", "rss_1k_mb": f"{rss_1k:.1f}",
        "cpu_per_1k_req_s": results["cpu_per_1k_req_s"],
        "grpc_vs_nginx": results["grpc_vs_nginx"],
    })
    return 0


if __name__ == "__main__":
    # the shim subprocess runs this checkout's meshlib, as the bench itself does
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    sys.exit(main())
