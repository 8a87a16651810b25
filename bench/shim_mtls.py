"""The price of mesh mTLS between two shims, side by side in one run.

Two chains against the same upstream (nginx answering a fixed body, bench/shim.py's), each
``wrk -> shim A (outbound) -> shim B (inbound) -> nginx``:

* ``clear``: both shims with ``--identity off`` (clear text between them);
* ``mtls``: both with ``--identity on``: certificates from a real signer through a throwaway
  etcd, shim A connects with TLS 1.3 to shim B's inbound port (registered ``"tls": true``).

Every shim runs on the last allowed core, the load, nginx, etcd and the signer on the first
(bench/shim.py's pinning); ``wrk -t1 -c32`` for ``--seconds`` per round, the chains take turns
for ``--rounds`` rounds in rotated order, and each chain's best round counts (a shared machine
only ever takes throughput away). Connections between the shims are kept alive, so this
measures the per-request price of TLS records, not handshakes (docs/mtls.md measures those).

Last line::

    shim_mtls mtls_vs_clear=<best mtls / best clear req/s>

Needs nginx and wrk (``apt-get install -y nginx-light wrk``).

    python bench/shim_mtls.py [--seconds 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from harness import etcd_server, print_ratio_line
from shim import Proc, cores, missing_tools, rounds_of, start_http_upstream, workspace, wrk

from meshlib.discovery.etcd_client import EtcdClient
from meshlib.identity.authority import Authority
from meshlib.identity.signer import Signer
from meshlib.identity.testing import TestCA
from meshlib.testing.process import free_port, log_tail


def start_shim(work: Path, core: int, etcd: str, prefix: str, name: str,
               *extra: str) -> tuple[Proc, int]:
    """A shim process; returns it and its outbound port once ``/ready`` answers 200."""
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "meshlib.shim", "--etcd", etcd, "--prefix", prefix,
            "--port", str(port), "--admin-port", str(admin), "--log-level", "warning", *extra]
    proc = Proc(name, argv, core, work)
    deadline = time.monotonic() + 30
    while True:
        proc.check()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready in 30 s:\n{log_tail(proc.log)}")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="wrk duration per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    missing = [t for t in missing_tools() if t.split()[0] in ("nginx", "wrk", "taskset")]
    if missing:
        print("bench/shim_mtls.py needs " + ", ".join(missing), file=sys.stderr)
        return 2
    load, proxy = cores()
    prefix = "/meshlib-bench-shim-mtls/v1"
    with ExitStack() as stack:
        work = stack.enter_context(workspace())
        etcd = stack.enter_context(etcd_server())
        client = EtcdClient(etcd.endpoint, timeout=3)
        stack.callback(client.close)
        signer = Signer(client, Authority.load(TestCA().write_dir(work / "ca")), prefix=prefix,
                        lifetime=dt.timedelta(hours=1))
        stack.callback(signer.close)
        if not signer.wait_active(10):
            raise RuntimeError("signer not active in 10 s")
        up, up_port = start_http_upstream(work, load)
        stack.callback(up.stop)
        chains: dict[str, tuple[int, str]] = {}
        for chain, identity in (("clear", "off"), ("mtls", "on")):
            service = f"bench-{chain}"
            back, _ = start_shim(work, proxy, etcd.endpoint, prefix, f"{chain}-inbound",
                                 "--service", service, "--app-port", str(up_port),
                                 "--health", "tcp", "--inbound-port", str(free_port()),
                                 "--identity", identity)
            stack.callback(back.stop)
            front, port = start_shim(work, proxy, etcd.endpoint, prefix, f"{chain}-outbound",
                                     "--service", "bench-caller", "--identity", identity)
            stack.callback(front.stop)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": service})
            with urllib.request.urlopen(req, timeout=10) as r:  # warm-up and a check
                assert r.status == 200, f"{chain}: status {r.status}"
            chains[chain] = (port, service)
        res = rounds_of({c: (lambda p=p, s=s: wrk(load, p, args.seconds, s))
                         for c, (p, s) in chains.items()}, args.rounds)
        for chain, rounds in res.items():
            print(f"{chain:6} best {max(rounds):9.0f} req/s  rounds "
                  + " ".join(f"{v:.0f}" for v in rounds))
        print_ratio_line("shim_mtls", {"mtls_vs_clear": max(res["mtls"]) / max(res["clear"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
