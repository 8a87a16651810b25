"""Per-call overhead of the mesh httpx clients against plain httpx, side by side.

One local upstream (nginx if installed, else a small asyncio server), one throwaway etcd
with the upstream registered as service ``bench`` and the default policy active
(least_request balancer, retry bookkeeping and budget, breaker and outlier state,
deadline header). Sync: ``httpx.Client`` vs ``mesh.http_client()``; async:
``httpx.AsyncClient`` vs ``mesh.async_http_client()``; the variants alternate in batches
(``harness.interleave``) so machine noise hits them alike. Then throughput with 16
concurrent tasks: plain ``httpx.AsyncClient`` vs the mesh async client.

Last line: ``http_overhead_ratio sync=<r> async=<r> async_c16_speedup=<x>``
(mesh p50 / plain p50; mesh req/s / plain req/s). Targets: <= 1.05, <= 1.05, >= 5.

    python bench/http_overhead.py [--calls 4000] [--batch 200] [--c16-calls 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx
from harness import (
    ainterleave,
    atimed,
    etcd_with_service,
    interleave,
    print_paired,
    print_ratio_line,
    report,
    timed,
)
from upstream import Upstream

MESH_URL = "http://bench/"


def _get(client: httpx.Client, url: str) -> None:
    r = client.get(url)
    r.read()
    assert r.status_code == 200


async def _aget(client: httpx.AsyncClient, url: str) -> None:
    r = await client.get(url)
    await r.aread()
    assert r.status_code == 200


async def throughput(client: httpx.AsyncClient, url: str, calls: int, tasks: int = 16) -> float:
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _aget(client, url)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return calls / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--c16-calls", type=int, default=4000)
    args = ap.parse_args()
    rounds = max(1, args.calls // args.batch)
    with Upstream() as up:
        url = f"http://127.0.0.1:{up.port}/"
        print(f"upstream: {up.kind} on {url}")
        with etcd_with_service("bench", up.port) as (_etcd, mesh):
            with httpx.Client(trust_env=False) as plain, mesh.http_client() as mc:
                runners = {"plain": lambda n: timed(lambda: _get(plain, url), n),
                           "mesh": lambda n: timed(lambda: _get(mc, MESH_URL), n)}
                interleave(runners, 4, 100)  # warm-up
                s = interleave(runners, rounds, args.batch)

            async def run_async() -> tuple[Any, float, float]:
                async with httpx.AsyncClient(trust_env=False) as plain, \
                        mesh.async_http_client() as mc:
                    runners = {"plain": lambda n: atimed(lambda: _aget(plain, url), n),
                               "mesh": lambda n: atimed(lambda: _aget(mc, MESH_URL), n)}
                    await ainterleave(runners, 4, 100)  # warm-up
                    a = await ainterleave(runners, rounds, args.batch)
                    await throughput(plain, url, 400)
                    await throughput(mc, MESH_URL, 400)
                    tp_plain = await throughput(plain, url, args.c16_calls)
                    tp_mesh = await throughput(mc, MESH_URL, args.c16_calls)
                return a, tp_plain, tp_mesh

            a, tp_plain, tp_mesh = asyncio.run(run_async())
    report("sync plain", s["plain"])
    report("sync mesh", s["mesh"])
    report("async plain", a["plain"])
    report("async mesh", a["mesh"])
    print(f"async c16 plain {tp_plain:8.0f} req/s   mesh {tp_mesh:8.0f} req/s")
    print_paired(s, {"sync": ("mesh", "plain")})
    print_paired(a, {"async": ("mesh", "plain")})
    print_ratio_line("http_overhead_ratio", {"sync": s.ratio("mesh", "plain"),
                                             "async": a.ratio("mesh", "plain"),
                                             "async_c16_speedup": f"{tp_mesh / tp_plain:.2f}"})


if __name__ == "__main__":
    main()
