"""The mesh gRPC channel's own per-call work, warm and with the caches a real call leaves.

``bench/grpc_overhead.py`` measures what a user sees (mesh p50 / plain grpcio p50), but its
noise on this 2-core VM (+-1 %) is larger than most changes to the call path. This bench
measures the path itself: a mesh stub whose endpoint callables are no-ops (so the call plan,
the gRPC driver and the telemetry run in full, and nothing else), timed

* ``warm``: back to back, as a tight loop sees it (``--calls`` of them, then the cold ones);
* ``cold``: right after a real unary call to a real server (a separate process). This is
  what the mesh costs inside a real call: while the thread waited for the response, the
  server and the kernel ran, and the first microseconds afterwards find the caches and TLB
  cold. Every function and object on the path then costs several times its warm price
  (measured here: an empty Python call ~0.08 us warm, ~0.55 us cold; 40 reads of one
  attribute 0.56 / 2.1 us; the whole mesh path ~3.3 / ~11-12 us).

So ``cold`` is the number to compare when changing the call path (docs/design.md 9 and 14):
``cold`` x 1 call over the plain call's p50 (~400 us here) is most of the mesh's share of
``bench/grpc_overhead.py``'s ratio. The rest is grpcio's own: the default deadline sent as
``grpc-timeout`` (~0.5-1 %) and grpcio's code running colder after ours (~0.5-1 %).

    .venv/bin/python bench/grpc_cold.py [--calls 8000]
    .venv/bin/python bench/grpc_cold.py --trees /path/to/old /path/to/new [--runs 6]

``--trees`` runs the measurement for each source tree in turn (a subprocess with that tree
first on ``PYTHONPATH``), alternating ``--runs`` times, and prints each tree's median: the
side-by-side comparison the inlining rule asks for. Last line:
``grpc_cold_us warm=<us> cold=<us>`` (or one such line per tree).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(os.environ.get("MESHLIB_BENCH_ROOT", pathlib.Path(__file__).resolve().parents[1]))


def measure(calls: int) -> tuple[float, float]:
    """(warm p50, cold p50) in microseconds of one mesh call with no-op endpoints."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]
    import grpc
    from grpc_proto import meshtest_pb2 as pb
    from grpc_proto import meshtest_pb2_grpc as pb_grpc

    import meshlib  # from ROOT, before the harness puts its own tree first on sys.path

    assert pathlib.Path(meshlib.__file__).parents[1] == ROOT, meshlib.__file__
    from harness import grpc_test_service

    req = pb.SimpleRequest(response_size=1, payload=pb.Payload(body=b"x"))
    clock = time.perf_counter_ns
    with grpc_test_service(ROOT) as (mesh, port):
        plain = grpc.insecure_channel(f"127.0.0.1:{port}",
                                      options=[("grpc.enable_retries", 0)])
        real = pb_grpc.TestServiceStub(plain).UnaryCall
        stub = pb_grpc.TestServiceStub(mesh.grpc_channel("bench"))
        call = stub.UnaryCall
        call(req)  # creates the endpoint's channel and multicallable
        # the endpoint callables (cached per endpoint key) become no-ops: the mesh's own
        # work is all that runs
        call._mcs = {key: (lambda *_a: None) for key in call._mcs}  # type: ignore[attr-defined]
        warm: list[int] = []
        cold: list[int] = []
        for _ in range(300):
            real(req)
            call(req)
        for _ in range(calls):
            t = clock()
            call(req)
            warm.append(clock() - t)
        for _ in range(calls):
            real(req)
            t = clock()
            call(req)
            cold.append(clock() - t)
        plain.close()
        return statistics.median(warm) / 1000, statistics.median(cold) / 1000


def compare(trees: list[str], runs: int, calls: int) -> int:
    results: dict[str, list[tuple[float, float]]] = {t: [] for t in trees}
    for _ in range(runs):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=tree, MESHLIB_BENCH_ROOT=tree)
            out = subprocess.run([sys.executable, __file__, "--calls", str(calls)], env=env,
                                 capture_output=True, text=True, check=True, cwd="/")
            last = out.stdout.strip().splitlines()[-1].split()
            w, c = (float(f.split("=")[1]) for f in last[1:3])
            results[tree].append((w, c))
            print(f"{tree}: warm={w:.2f} cold={c:.2f}", flush=True)
    for tree, rs in results.items():
        print(f"grpc_cold_us tree={tree} warm={statistics.median(r[0] for r in rs):.2f} "
              f"cold={statistics.median(r[1] for r in rs):.2f} runs={len(rs)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=8000)
    ap.add_argument("--trees", nargs="+", help="source trees to compare, alternated")
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args()
    if args.trees:
        return compare(args.trees, args.runs, args.calls)
    w, c = measure(args.calls)
    print(f"grpc_cold_us warm={w:.2f} cold={c:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
