"""How fast a change written to etcd reaches watching clients.

Starts a throwaway etcd and N independent watching clients (each a ``Mesh`` with its
own etcd connection and watch stream, spread over a few worker processes so the GIL of
one process does not serialise them). The driver then writes, alternately, a policy
change and an endpoint change, and each client stamps the moment the new snapshot is
visible (``time.monotonic`` is the system-wide CLOCK_MONOTONIC on Linux, so stamps from
different processes compare). Latency = visible - just before the put was sent.

Prints p50/p99 per kind and, as the last line, ``propagation_p99_ms=<value>``.
Target (issue 2): p99 <= 50 ms on loopback.

    python bench/propagation.py [--clients 50] [--rounds 40] [--workers 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

from harness import BENCH_PREFIX, etcd_server, pct, report

SERVICE = "bench"


def _worker(endpoint: str, prefix: str, n: int, out: mp.Queue, ready: mp.Queue, stop) -> None:
    from meshlib import Mesh

    meshes = []
    for i in range(n):
        mesh = Mesh(endpoint, prefix=prefix, handle_sigterm=False)
        seen: dict[str, float] = {}

        def on_change(service: str, snap, seen=seen, idx=i) -> None:
            now = time.monotonic()
            marks = [f"p{snap.policy.concurrency.max_requests}"]
            marks += [f"e{e.port}" for e in snap.endpoints]
            for m in marks:
                if m not in seen:
                    seen[m] = now
                    out.put((m, idx, now))

        mesh.add_listener(on_change)
        mesh.wait_for(SERVICE, min_endpoints=1, timeout=30)
        meshes.append(mesh)
    ready.put(n)
    stop.wait()
    for mesh in meshes:
        mesh.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--workers", type=int, default=5)
    args = ap.parse_args()

    from meshlib.discovery.etcd_client import EtcdClient

    prefix = BENCH_PREFIX
    with etcd_server() as etcd:
        client = EtcdClient(etcd.endpoint)
        inst = f"{prefix}/services/{SERVICE}/instances/"
        client.put(inst + "base", b'{"address": "127.0.0.1", "port": 1}')
        ctx = mp.get_context("spawn")
        out, ready, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        per = [args.clients // args.workers + (i < args.clients % args.workers)
               for i in range(args.workers)]
        procs = [ctx.Process(target=_worker, args=(etcd.endpoint, prefix, n, out, ready, stop))
                 for n in per if n]
        for p in procs:
            p.start()
        got = sum(ready.get(timeout=120) for _ in procs)
        assert got == args.clients
        while not out.empty():
            out.get()
        sent: dict[str, tuple[str, float]] = {}
        for r in range(args.rounds):
            if r % 2 == 0:
                mark = f"p{2000 + r}"
                t0 = time.monotonic()
                client.put(f"{prefix}/services/{SERVICE}/policy",
                           f"concurrency: {{max_requests: {2000 + r}}}\n".encode())
                sent[mark] = ("policy", t0)
            else:
                mark = f"e{10000 + r}"
                t0 = time.monotonic()
                client.put(inst + f"i{r}", json.dumps({"address": "127.0.0.1",
                                                       "port": 10000 + r}).encode())
                sent[mark] = ("endpoint", t0)
            time.sleep(0.05)
        lat: dict[str, list[float]] = {"policy": [], "endpoint": []}
        expected = len(sent) * args.clients
        seen = 0
        deadline = time.monotonic() + 30
        while seen < expected and time.monotonic() < deadline:
            try:
                mark, _idx, t = out.get(timeout=1)
            except Exception:
                continue
            if mark in sent:
                kind, t0 = sent[mark]
                lat[kind].append(t - t0)
                seen += 1
        stop.set()
        for p in procs:
            p.join(30)
        client.close()
    missing = expected - seen
    everything = lat["policy"] + lat["endpoint"]
    for kind, values in lat.items():
        if values:
            report(kind, values, "ms")
    print(f"clients={args.clients} rounds={args.rounds} missing_deliveries={missing}")
    print(f"propagation_p99_ms={pct(everything, 0.99) * 1000:.2f}")


if __name__ == "__main__":
    main()
