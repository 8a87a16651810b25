"""The README's demo: services finding each other through a real etcd.

Starts a throwaway etcd, a few instances of a small HTTP service that register
themselves, and a client that calls them through discovery. It shows instances
appearing and disappearing as they start and stop, and a policy changed live (and a bad
one refused). Runs a scripted scenario of about 20 seconds; ``--forever`` keeps the
traffic going until Ctrl-C. Ctrl-C at any time stops everything and leaves no process.

    python -m meshlib.demo
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

SERVICE = "hello"


# --- one instance of the demo service (runs in a child process) ---------------------------
def run_instance(etcd: str, name: str, version: str) -> None:
    from meshlib import Mesh

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            body = json.dumps({"instance": name, "version": version, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    mesh = Mesh(etcd)
    mesh.register(SERVICE, port, labels={"version": version}, instance_id=name, ttl=5)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        mesh.close()  # revokes the lease: callers stop routing here at once
        server.server_close()


# --- the demo driver -----------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Demo:
    def __init__(self, forever: bool) -> None:
        self.forever = forever
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stop = threading.Event()

    def start_instance(self, etcd: str, name: str, version: str) -> None:
        _say(f"starting instance {name} ({version})")
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "meshlib.demo", "--instance", name, "--version", version,
             "--etcd", etcd],
            start_new_session=True,
        )

    def stop_instance(self, name: str) -> None:
        proc = self.children.pop(name, None)
        if proc is not None:
            _say(f"stopping instance {name} (SIGTERM: it deregisters)")
            proc.terminate()
            proc.wait(10)

    def traffic(self, mesh: object) -> None:
        """Call the service through discovery, round robin over the current snapshot."""
        counter = itertools.count()
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while not self.stop.is_set():
                snap = mesh.snapshot(SERVICE)  # type: ignore[attr-defined]
                if snap.endpoints:
                    ep = snap.endpoints[next(counter) % len(snap.endpoints)]
                    try:
                        r = http.get(f"http://{ep.authority}/hello")
                        answer = r.json()
                        _say(f"  call -> {answer['instance']} ({answer['version']})")
                    except httpx.HTTPError as exc:
                        _say(f"  call -> {ep.instance_id} failed: {exc!r}")
                self.stop.wait(0.5)

    def run(self) -> None:
        from meshlib import Mesh
        from meshlib.testing import EtcdServer

        etcd = EtcdServer().start()
        _say(f"etcd started at {etcd.endpoint}")
        mesh = Mesh(etcd.endpoint)
        layout = mesh.layout

        def on_change(service: str, snap: object) -> None:
            eps = ", ".join(e.instance_id for e in snap.endpoints)  # type: ignore[attr-defined]
            pol = snap.policy  # type: ignore[attr-defined]
            _say(
                f"snapshot {service}: [{eps}] policy rev {snap.policy_revision} "  # type: ignore[attr-defined]
                f"(balancer={pol.load_balancer.policy}, timeout={pol.timeout}s)"
            )

        mesh.add_listener(on_change)
        mesh.watch(SERVICE)
        traffic = threading.Thread(target=self.traffic, args=(mesh,), daemon=True)
        try:
            self.start_instance(etcd.endpoint, "hello-a", "v1")
            self.start_instance(etcd.endpoint, "hello-b", "v1")
            mesh.wait_for(SERVICE, min_endpoints=2, timeout=20)
            traffic.start()
            time.sleep(3)
            self.start_instance(etcd.endpoint, "hello-c", "v2")
            mesh.wait_for(SERVICE, min_endpoints=3, timeout=20)
            time.sleep(3)
            self.stop_instance("hello-a")
            time.sleep(3)
            _say("operator writes a policy: round_robin, timeout 2s")
            mesh.client.put(
                layout.policy_key(SERVICE),
                b"load_balancer: {policy: round_robin}\ntimeout: 2s\n",
            )
            time.sleep(2)
            _say("operator writes a BAD policy (attempts: 9): refused, the last good one stays")
            mesh.client.put(layout.policy_key(SERVICE), b"retries: {attempts: 9}\n")
            time.sleep(2)
            snap = mesh.snapshot(SERVICE)
            _say(
                f"policy in force: balancer={snap.policy.load_balancer.policy}, "
                f"attempts={snap.policy.retries.attempts}"
            )
            if self.forever:
                _say("running until Ctrl-C")
                while True:
                    time.sleep(1)
            _say("demo done")
        except KeyboardInterrupt:
            _say("interrupted")
        finally:
            self.stop.set()
            for name in list(self.children):
                self.stop_instance(name)
            mesh.close()
            etcd.stop()
            _say("all processes stopped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshlib demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--forever", action="store_true", help="keep running until Ctrl-C")
    p.add_argument("--instance", help=argparse.SUPPRESS)
    p.add_argument("--version", default="v1", help=argparse.SUPPRESS)
    p.add_argument("--etcd", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MESHLIB_LOG", "WARNING"))
    if args.instance:
        run_instance(args.etcd, args.instance, args.version)
        return 0
    Demo(args.forever).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
