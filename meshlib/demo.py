"""The README's demo: services finding each other through a real etcd, called through the mesh.

Starts a throwaway etcd, a few instances of a small HTTP service that register
themselves, and a client that calls ``http://hello/hello`` through ``mesh.http_client()``
(about 100 calls a second, summarised once a second). In a scripted run of about 30
seconds it shows:

* instances appearing and disappearing as they start and stop (SIGTERM deregisters);
* a policy changed live through etcd, and a bad one refused (the last good one stays);
* an instance SIGKILLed in the middle of the traffic: its record stays in etcd until its
  lease expires, and the mesh's retries send its calls elsewhere: zero failed calls;
* a 90/10 canary split pushed through etcd: the per-version counts shift at once;
* a misbehaving instance (answers 503): its calls are retried elsewhere, it is ejected
  (outlier detection), and it is taken back after its ejection time once it is healthy.

Telemetry: every instance records the server series and serves ``/metrics`` on its service
port; ``--metrics-port`` serves the client's series (HTTP client, attempts, retries,
breakers, ejections, etcd) and ``--prometheus-targets FILE`` keeps a Prometheus file_sd
target list of the client and the live instances, for the Grafana dashboard in
``adapters/grafana/``.

``--forever`` keeps the traffic going until Ctrl-C. Ctrl-C or SIGTERM at any time stops
everything and leaves no process: the demo owns its process, so it takes SIGTERM and SIGINT
itself (both run the same cleanup: instances are stopped and deregister, then etcd stops).
Each instance also holds a pipe from the demo (its stdin) and stops when that pipe closes,
so instances end even when the demo is killed with SIGKILL.

    python -m meshlib.demo
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

SERVICE = "hello"
URL = f"http://{SERVICE}/hello"


# --- one instance of the demo service (runs in a child process) ---------------------------
def run_instance(etcd: str, name: str, version: str) -> None:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    from meshlib import Mesh
    from meshlib.telemetry import HttpServerRecorder, MeshMetrics

    state = {"mode": "ok"}
    MeshMetrics.default()  # every meshlib family on the process registry, before a scrape
    recorder = HttpServerRecorder.get()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as mesh clients expect
        disable_nagle_algorithm = True

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            # head and body in one write (as real servers do): no delayed-ACK stall between
            # them, and a SIGKILL never cuts a response between its head and its body
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            head: list[bytes] = self.__dict__["_headers_buffer"]
            head.append(b"\r\n")
            self.wfile.write(b"".join(head) + body)
            head.clear()

        def _record(self, status: int, route: str | None, start: float) -> None:
            """The server series (docs/metrics.md), as MeshWSGIMiddleware would record them:
            route template, never the raw path; the caller from x-mesh-caller."""
            recorder.request(self.command, status, route, None, time.perf_counter() - start,
                             caller=self.headers.get("x-mesh-caller") or "")

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/metrics":  # Prometheus scrape: not a request of the service
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                return
            start = time.perf_counter()
            route = "/hello" if self.path.split("?")[0] == "/hello" else None
            if state["mode"] == "503":
                self._send(503, json.dumps({"instance": name, "error": "misbehaving"}).encode())
                self._record(503, route, start)
                return
            body = json.dumps({"instance": name, "version": version, "path": self.path})
            self._send(200, body.encode())
            self._record(200, route, start)

        def do_POST(self) -> None:  # noqa: N802  POST /admin/mode/<ok|503>: demo control
            start = time.perf_counter()
            self.rfile.read(int(self.headers.get("content-length") or 0))
            state["mode"] = self.path.rsplit("/", 1)[-1]
            self._send(200, json.dumps(state).encode())
            self._record(200, "/admin/mode/{mode}", start)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    mesh = Mesh(etcd)
    mesh.register(SERVICE, port, labels={"version": version}, instance_id=name, ttl=5)

    def shutdown() -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    def stop(signum: int, frame: object) -> None:
        shutdown()

    def lifeline() -> None:
        """Stop when the demo's end of our stdin closes: the demo exited, however it died.
        (``os.read`` on the descriptor, not ``sys.stdin``: a daemon thread blocked inside a
        buffered reader aborts the interpreter at exit, "could not acquire lock".)"""
        while os.read(0, 4096):
            pass
        shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=lifeline, name="lifeline", daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        mesh.close()  # revokes the lease: callers stop routing here at once
        server.server_close()


# --- the demo driver -----------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


#: The operator's policy: fast retries, outlier ejection that also works for a handful of
#: instances (the default max_ejection_percent of 10 never ejects in a service this small).
POLICY: dict[str, Any] = {
    "timeout": "2s",
    "load_balancer": {"policy": "round_robin"},
    "retries": {"attempts": 3, "backoff": {"base": "5ms", "max": "50ms"}},
    "outlier_detection": {"consecutive_gateway_failure": 3, "base_ejection_time": "3s",
                          "interval": "3s", "max_ejection_percent": 50},
}
CANARY: dict[str, Any] = {
    **POLICY,
    "subsets": {"stable": {"labels": {"version": "v1"}}, "canary": {"labels": {"version": "v2"}}},
    "routes": [{"name": "canary-10-percent", "split": [{"subset": "stable", "weight": 90},
                                                        {"subset": "canary", "weight": 10}]}],
}


class Traffic:
    """Calls ``http://hello/hello`` through ``mesh.http_client()`` and counts the answers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_instance: collections.Counter[str] = collections.Counter()
        self.by_version: collections.Counter[str] = collections.Counter()
        self.calls = 0
        self.failed = 0
        self.last_error = ""

    def totals(self) -> tuple[int, int, collections.Counter[str], collections.Counter[str]]:
        with self.lock:
            return (self.calls, self.failed, collections.Counter(self.by_instance),
                    collections.Counter(self.by_version))

    def run(self, mesh: Any, stop: threading.Event) -> None:
        with mesh.http_client(timeout=5.0) as http:
            while not stop.is_set():
                ok, instance, version, error = False, "", "", ""
                try:
                    r = http.get(URL)
                    if r.status_code == 200:
                        answer = r.json()
                        ok, instance, version = True, answer["instance"], answer["version"]
                    else:
                        error = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.calls += 1
                    if ok:
                        self.by_instance[instance] += 1
                        self.by_version[version] += 1
                    else:
                        self.failed += 1
                        self.last_error = error
                stop.wait(0.01)


def _fmt(counter: collections.Counter[str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "-"


class Demo:
    def __init__(self, forever: bool, metrics_port: int | None = None,
                 targets_file: str | None = None) -> None:
        self.forever = forever
        self.metrics_port = metrics_port
        self.targets_file = targets_file
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stop = threading.Event()
        self.traffic = Traffic()

    def start_instance(self, etcd: str, name: str, version: str) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshlib.demo", "--instance", name, "--version", version,
             "--etcd", etcd],
            start_new_session=True,  # a terminal's Ctrl-C reaches the demo only; it stops us
            stdin=subprocess.PIPE,  # the lifeline: closed when the demo exits, however it dies
        )
        self.children[name] = proc
        _say(f"started instance {name} ({version}), pid {proc.pid}")

    def stop_instance(self, name: str) -> None:
        proc = self.children.pop(name, None)
        if proc is not None:
            _say(f"stopping instance {name} (SIGTERM: it deregisters)")
            self._end([proc])

    @staticmethod
    def _end(procs: list[subprocess.Popen[bytes]], timeout: float = 10) -> None:
        """SIGTERM every process, wait for all (``timeout`` in total), SIGKILL what is left."""
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                status = proc.wait(max(0.0, deadline - time.monotonic()))
                if status != 0:
                    _say(f"pid {proc.pid} exited abnormally (status {status})")
            except subprocess.TimeoutExpired:
                _say(f"pid {proc.pid} did not stop within {timeout:.0f}s: SIGKILL")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()

    def stop_all(self) -> None:
        """Stop every instance at once (each deregisters while etcd still runs)."""
        if self.children:
            _say(f"stopping instances {', '.join(self.children)} (SIGTERM: they deregister)")
            procs = list(self.children.values())
            self.children.clear()
            self._end(procs)

    def kill_instance(self, name: str) -> None:
        proc = self.children.pop(name)
        _say(f"SIGKILL {name}: it cannot deregister; its record stays until its lease expires")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdin is not None:
            proc.stdin.close()

    def report(self) -> None:
        """Once a second: calls, failures and answers per instance over the last second."""
        before = self.traffic.totals()
        while not self.stop.wait(1.0):
            now = self.traffic.totals()
            calls, failed = now[0] - before[0], now[1] - before[1]
            _say(f"  traffic: {calls} calls, {failed} failed; answered by: "
                 f"{_fmt(now[2] - before[2])}")
            before = now

    def measure(self, seconds: float) -> tuple[int, int, collections.Counter[str]]:
        """(calls, failed, answers per version) over the next ``seconds``."""
        c0, f0, _i0, v0 = self.traffic.totals()
        time.sleep(seconds)
        c1, f1, _i1, v1 = self.traffic.totals()
        return c1 - c0, f1 - f0, v1 - v0

    def set_mode(self, mesh: Any, name: str, mode: str) -> None:
        """Tell instance ``name`` to answer ``mode``. The address is an IP literal, so the same
        mesh client passes the call straight through (not a mesh service name)."""
        ep = next(e for e in mesh.snapshot(SERVICE).endpoints if e.instance_id == name)
        with mesh.http_client() as http:
            http.post(f"http://{ep.authority}/admin/mode/{mode}")

    def run(self) -> int:
        """The scripted scenario (or, with ``forever``, traffic until a signal); returns the
        exit status: 0, or 128 + the signal number after SIGINT / SIGTERM."""
        from meshlib import Mesh
        from meshlib.testing import EtcdServer

        etcd = EtcdServer().start()
        _say(f"etcd started at {etcd.endpoint}, pid {etcd.pid}")
        mesh = Mesh(etcd.endpoint, service="demo-client")
        layout = mesh.layout
        metrics_server = None
        if self.metrics_port is not None:
            from meshlib.telemetry import start_metrics_server

            metrics_server = start_metrics_server(self.metrics_port)
            _say(f"client metrics at {metrics_server.url}; every instance serves /metrics "
                 "on its own port")
            if self.targets_file:
                _say(f"Prometheus file_sd targets: {self.targets_file} "
                     "(dashboard: adapters/grafana/meshlib-dashboard.json)")
                self._write_targets(metrics_server.port, ())

        def on_change(service: str, snap: Any) -> None:
            if metrics_server is not None and self.targets_file:
                self._write_targets(metrics_server.port, snap.endpoints)
            eps = ", ".join(e.instance_id for e in snap.endpoints)
            pol = snap.policy
            _say(
                f"snapshot {service}: [{eps}] policy rev {snap.policy_revision} "
                f"(balancer={pol.load_balancer.policy}, timeout={pol.timeout}s, "
                f"routes={len(pol.routes)})"
            )

        mesh.add_listener(on_change)
        mesh.watch(SERVICE)
        threads = [threading.Thread(target=self.traffic.run, args=(mesh, self.stop), daemon=True)
                   for _ in range(2)]
        threads.append(threading.Thread(target=self.report, daemon=True))
        status = 0
        # The demo owns its process: SIGTERM runs the same cleanup as Ctrl-C. (Installed after
        # EtcdServer's handlers, which would kill etcd and then the process at once, leaving
        # the instances running.)
        _take_signals()
        try:
            self.start_instance(etcd.endpoint, "hello-a", "v1")
            self.start_instance(etcd.endpoint, "hello-b", "v1")
            mesh.wait_for(SERVICE, min_endpoints=2, timeout=20)
            _say(f"traffic starts: GET {URL} through mesh.http_client()")
            for t in threads:
                t.start()
            time.sleep(2)
            self.start_instance(etcd.endpoint, "hello-c", "v2")
            mesh.wait_for(SERVICE, min_endpoints=3, timeout=20)
            time.sleep(2)
            self.stop_instance("hello-a")
            time.sleep(2)
            _say("operator writes a policy: round_robin, timeout 2s, retries, outlier ejection")
            mesh.client.put(layout.policy_key(SERVICE), json.dumps(POLICY).encode())
            time.sleep(2)
            _say("operator writes a BAD policy (attempts: 9): refused, the last good one stays")
            mesh.client.put(layout.policy_key(SERVICE), b"retries: {attempts: 9}\n")
            time.sleep(1)
            snap = mesh.snapshot(SERVICE)
            _say(
                f"policy in force: balancer={snap.policy.load_balancer.policy}, "
                f"attempts={snap.policy.retries.attempts}"
            )
            self.start_instance(etcd.endpoint, "hello-d", "v1")
            self.start_instance(etcd.endpoint, "hello-e", "v1")
            mesh.wait_for(SERVICE, min_endpoints=4, timeout=20)
            time.sleep(1)

            # 1. an instance dies mid-traffic
            c0, f0, *_ = self.traffic.totals()
            self.kill_instance("hello-b")
            time.sleep(3)
            c1, f1, *_ = self.traffic.totals()
            _say(f"RESULT kill: {f1 - f0} failed calls out of {c1 - c0} in the 3 s after "
                 "SIGKILL (connect failures retried on another instance)")

            # 2. a canary split pushed through etcd
            calls, failed, before = self.measure(2)
            _say(f"per version before the split: {_fmt(before)}")
            _say("operator pushes a 90/10 canary split (v1 stable, v2 canary) through etcd")
            mesh.client.put(layout.policy_key(SERVICE), json.dumps(CANARY).encode())
            time.sleep(0.2)
            calls, failed, after = self.measure(3)
            share = 100.0 * after["v2"] / max(1, calls - failed)
            _say(f"RESULT split: per version over 3 s: {_fmt(after)} ({share:.1f}% to v2)")

            # 3. a misbehaving instance is ejected, then taken back
            dest = mesh.destination(SERVICE)
            _say("hello-e starts answering 503")
            c0, f0, *_ = self.traffic.totals()
            self.set_mode(mesh, "hello-e", "503")
            t_bad = time.monotonic()
            ep_e = next(e for e in mesh.snapshot(SERVICE).endpoints if e.instance_id == "hello-e")
            ejected = self._wait(lambda: self._ejected(dest, ep_e), 3)
            _say(f"RESULT eject: hello-e ejected {time.monotonic() - t_bad:.2f}s after it went "
                 f"bad" if ejected else "hello-e was not ejected (no traffic reached it?)")
            time.sleep(1.5)
            _say("hello-e is fixed (answers 200 again); still ejected for the rest of 3 s")
            self.set_mode(mesh, "hello-e", "ok")
            _i = self.traffic.totals()[2]["hello-e"]
            back = self._wait(lambda: self.traffic.totals()[2]["hello-e"] > _i, 6)
            c1, f1, *_ = self.traffic.totals()
            _say(f"RESULT readmit: hello-e {'is back, serving again' if back else 'not back'}; "
                 f"{f1 - f0} failed calls out of {c1 - c0} meanwhile (503s retried elsewhere)")
            time.sleep(1)
            if self.forever:
                _say("running until Ctrl-C or SIGTERM")
                while True:
                    time.sleep(1)
            calls, failed, *_ = self.traffic.totals()
            _say(f"demo done: {calls} calls, {failed} failed"
                 + (f" (last error: {self.traffic.last_error})" if failed else ""))
        except Interrupted as exc:
            _say(f"interrupted ({exc.signal.name})")
            status = 128 + exc.signal
        finally:
            _ignore_signals()  # a second Ctrl-C / SIGTERM must not cut the cleanup short
            self.stop.set()
            for t in threads:
                if t.is_alive():
                    t.join(5)
            self.stop_all()
            if metrics_server is not None:
                metrics_server.close()
            mesh.close()
            etcd.stop()
            _say("all processes stopped")
        return status

    def _write_targets(self, client_port: int, endpoints: Any) -> None:
        """Prometheus ``file_sd_configs`` targets: the client and the live instances (their
        metrics are on their service port). Written to a temp file and renamed, as
        Prometheus' file SD docs ask, so a scrape config never reads half a file."""
        assert self.targets_file is not None
        groups = [{"targets": [f"127.0.0.1:{client_port}"], "labels": {"job": "demo-client"}},
                  {"targets": sorted(e.authority for e in endpoints),
                   "labels": {"job": SERVICE}}]
        tmp = f"{self.targets_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(groups, f, indent=1)
        os.replace(tmp, self.targets_file)

    @staticmethod
    def _ejected(dest: Any, ep: Any) -> bool:
        slot = dest.health.get(ep)
        return slot is not None and slot.ejected_until > time.monotonic()

    @staticmethod
    def _wait(pred: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.02)
        return bool(pred())


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the demo: stop everything (``signal`` says which)."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(sig.name)
        self.signal = sig


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum))


def _take_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def _ignore_signals() -> None:
    """During the cleanup (bounded: 10 s per instance, then SIGKILL)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshlib demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--forever", action="store_true",
                   help="keep running until Ctrl-C (or SIGTERM)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve the client's metrics on 127.0.0.1:PORT/metrics (0: any port); "
                        "instances always serve /metrics on their service port")
    p.add_argument("--prometheus-targets", metavar="FILE",
                   help="with --metrics-port: keep FILE up to date as a Prometheus "
                        "file_sd_configs target list (client + live instances)")
    p.add_argument("--instance", help=argparse.SUPPRESS)
    p.add_argument("--version", default="v1", help=argparse.SUPPRESS)
    p.add_argument("--etcd", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MESHLIB_LOG", "WARNING"))
    if args.instance:
        run_instance(args.etcd, args.instance, args.version)
        return 0
    if args.prometheus_targets and args.metrics_port is None:
        p.error("--prometheus-targets needs --metrics-port")
    return Demo(args.forever, args.metrics_port, args.prometheus_targets).run()


if __name__ == "__main__":
    sys.exit(main())
