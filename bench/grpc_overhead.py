"""Overhead of the mesh gRPC channel over a plain grpcio channel (unary, 1-byte payload).

One ``meshtest.TestService`` server runs in a separate process (tests/integration/
grpc_servers.py); a real etcd (meshlib.testing.EtcdServer) holds its registration. Four
variants are measured in alternating batches within one run, so drift (CPU frequency, other
load) hits them alike: plain sync channel, mesh sync channel, plain ``grpc.aio`` channel,
mesh ``grpc.aio`` channel. Calls are sequential (latency, not throughput). The mesh variants
run the full call plan with the default policy (including its 15 s deadline, sent as
``grpc-timeout``).

Many short batches (default 200 rounds of 40 calls per variant, rotating order) rather than a
few long ones: on a shared machine the latency drifts by several percent within seconds, and
short interleaved batches spread that drift evenly over the variants (with 12 rounds of 400 the
same code measured anywhere from 1.01 to 1.06 run to run; with 200 x 40, within +-0.5 %).

    .venv/bin/python bench/grpc_overhead.py [--rounds 200] [--batch 40]

Last line: ``grpc_overhead_ratio sync=<r> aio=<r>`` (mesh p50 / plain p50). Target <= 1.05.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_proto import meshtest_pb2 as pb  # noqa: E402
from grpc_proto import meshtest_pb2_grpc as pb_grpc  # noqa: E402
from harness import grpc_test_service  # noqa: E402

REQ = pb.SimpleRequest(response_size=1, payload=pb.Payload(body=b"x"))


def pct(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # us


def sync_batch(stub: pb_grpc.TestServiceStub, n: int, out: list[int]) -> None:
    call = stub.UnaryCall
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        call(REQ)
        out.append(clock() - t)


async def aio_batch(stub: pb_grpc.TestServiceStub, n: int, out: list[int]) -> None:
    call = stub.UnaryCall
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        await call(REQ)
        out.append(clock() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--batch", type=int, default=40)
    args = ap.parse_args()

    with grpc_test_service() as (mesh, port):
        target = f"127.0.0.1:{port}"
        plain = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
        meshch = mesh.grpc_channel("bench")
        stubs = {"plain_sync": pb_grpc.TestServiceStub(plain),
                 "mesh_sync": pb_grpc.TestServiceStub(meshch)}
        loop = asyncio.new_event_loop()

        async def make_aio() -> tuple[object, object]:
            return (grpc.aio.insecure_channel(target,
                                              options=[("grpc.enable_retries", 0)]),
                    mesh.async_grpc_channel("bench"))

        aplain, amesh = loop.run_until_complete(make_aio())
        stubs["plain_aio"] = pb_grpc.TestServiceStub(aplain)
        stubs["mesh_aio"] = pb_grpc.TestServiceStub(amesh)
        samples: dict[str, list[int]] = {k: [] for k in stubs}
        # warm-up (connections, code paths)
        for name, stub in stubs.items():
            sink: list[int] = []
            if name.endswith("aio"):
                loop.run_until_complete(aio_batch(stub, 200, sink))
            else:
                sync_batch(stub, 200, sink)
        order = list(stubs)
        paired: dict[str, list[float]] = {"sync": [], "aio": []}
        for r in range(args.rounds):
            rot = order[r % 4:] + order[:r % 4]
            round_p50: dict[str, float] = {}
            for name in rot:
                batch: list[int] = []
                if name.endswith("aio"):
                    loop.run_until_complete(aio_batch(stubs[name], args.batch, batch))
                else:
                    sync_batch(stubs[name], args.batch, batch)
                samples[name] += batch
                round_p50[name] = statistics.median(batch)
            for kind in ("sync", "aio"):
                paired[kind].append(round_p50[f"mesh_{kind}"] / round_p50[f"plain_{kind}"])
        for name in order:
            s = samples[name]
            print(f"{name:11s} n={len(s):6d} p50={pct(s, 0.5):8.1f}us "
                  f"p99={pct(s, 0.99):8.1f}us mean={statistics.fmean(s) / 1000:8.1f}us")

        async def close_aio() -> None:
            await aplain.close()  # type: ignore[attr-defined]
            await amesh.close()  # type: ignore[attr-defined]

        loop.run_until_complete(close_aio())
        loop.close()
        plain.close()
        meshch.close()
        # the same ratio per round (batches run back to back), robust to drift between rounds
        print("paired per-round p50 ratio (median [min, max]): " + "  ".join(
            f"{k}={statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]"
            for k, v in paired.items()))
        rs = pct(samples["mesh_sync"], 0.5) / pct(samples["plain_sync"], 0.5)
        ra = pct(samples["mesh_aio"], 0.5) / pct(samples["plain_aio"], 0.5)
        print(f"grpc_overhead_ratio sync={rs:.3f} aio={ra:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
