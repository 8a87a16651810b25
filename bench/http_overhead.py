"""Per-call overhead of the mesh httpx clients against plain httpx, side by side.

One local upstream (nginx if installed, else a small asyncio server), one throwaway etcd
with the upstream registered as service ``bench`` and the default policy active
(least_request balancer, retry bookkeeping and budget, breaker and outlier state,
deadline header). Sync: ``httpx.Client`` vs ``mesh.http_client()``; async:
``httpx.AsyncClient`` vs ``mesh.async_http_client()``; the variants alternate in batches
so machine noise hits them alike. Then throughput with 16 concurrent tasks: plain
``httpx.AsyncClient`` vs the mesh async client.

Last line: ``http_overhead_ratio sync=<r> async=<r> async_c16_speedup=<x>``
(mesh p50 / plain p50; mesh req/s / plain req/s). Targets: <= 1.05, <= 1.05, >= 5.

    python bench/http_overhead.py [--calls 4000] [--batch 200] [--c16-calls 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from upstream import Upstream  # noqa: E402

from meshlib import Mesh  # noqa: E402
from meshlib.testing import EtcdServer  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1)))]


def _report(name: str, samples: list[float]) -> float:
    p50 = statistics.median(samples)
    print(f"{name:14s} n={len(samples):6d} p50={p50 * 1e6:8.1f} us p99={_pct(samples, 0.99) * 1e6:8.1f} us")
    return p50


def sync_round(plain: httpx.Client, mesh_client: httpx.Client, url: str, calls: int, batch: int):
    out: dict[str, list[float]] = {"plain": [], "mesh": []}
    pc = time.perf_counter
    for i in range(calls // batch):
        order = [("plain", plain, url), ("mesh", mesh_client, "http://bench/")]
        if i % 2:
            order.reverse()
        for name, client, u in order:
            samples = out[name]
            for _ in range(batch):
                t0 = pc()
                r = client.get(u)
                r.read()
                samples.append(pc() - t0)
                assert r.status_code == 200
    return out


async def async_round(plain, mesh_client, url: str, calls: int, batch: int):
    out: dict[str, list[float]] = {"plain": [], "mesh": []}
    pc = time.perf_counter
    for i in range(calls // batch):
        order = [("plain", plain, url), ("mesh", mesh_client, "http://bench/")]
        if i % 2:
            order.reverse()
        for name, client, u in order:
            samples = out[name]
            for _ in range(batch):
                t0 = pc()
                r = await client.get(u)
                await r.aread()
                samples.append(pc() - t0)
                assert r.status_code == 200
    return out


async def throughput(client, url: str, calls: int, tasks: int = 16) -> float:
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            r = await client.get(url)
            await r.aread()
            assert r.status_code == 200

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return calls / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--c16-calls", type=int, default=4000)
    args = ap.parse_args()
    with Upstream() as up, EtcdServer() as etcd:
        url = f"http://127.0.0.1:{up.port}/"
        print(f"upstream: {up.kind} on {url}")
        with Mesh(etcd.endpoint, prefix="/meshlib-bench/v1") as mesh:
            mesh.register("bench", up.port)
            mesh.wait_for("bench", timeout=10)
            with httpx.Client(trust_env=False) as plain, mesh.http_client() as mc:
                sync_round(plain, mc, url, 400, 100)  # warm-up
                s = sync_round(plain, mc, url, args.calls, args.batch)
            sp = _report("sync plain", s["plain"])
            sm = _report("sync mesh", s["mesh"])

            async def run_async():
                async with httpx.AsyncClient(trust_env=False) as plain, \
                        mesh.async_http_client() as mc:
                    await async_round(plain, mc, url, 400, 100)
                    a = await async_round(plain, mc, url, args.calls, args.batch)
                    await throughput(plain, url, 400)
                    await throughput(mc, "http://bench/", 400)
                    tp_plain = await throughput(plain, url, args.c16_calls)
                    tp_mesh = await throughput(mc, "http://bench/", args.c16_calls)
                return a, tp_plain, tp_mesh

            a, tp_plain, tp_mesh = asyncio.run(run_async())
            ap50 = _report("async plain", a["plain"])
            am50 = _report("async mesh", a["mesh"])
            print(f"async c16 plain {tp_plain:8.0f} req/s   mesh {tp_mesh:8.0f} req/s")
    print(f"http_overhead_ratio sync={sm / sp:.3f} async={am50 / ap50:.3f} "
          f"async_c16_speedup={tp_mesh / tp_plain:.2f}")


if __name__ == "__main__":
    main()
