"""A gRPC service that registers itself in the mesh, and a client that calls it through it.

    # terminal 1: etcd (any etcd 3.5; tests use .venv/bin/etcd)
    .venv/bin/etcd --data-dir /tmp/etcd-demo
    # terminal 2 and 3: two instances of the service
    .venv/bin/python examples/grpc_orders.py serve --id a
    .venv/bin/python examples/grpc_orders.py serve --id b --version v2
    # terminal 4: the client (balanced over both; retries, breakers, policies from etcd)
    .venv/bin/python examples/grpc_orders.py call --count 10

The service is the test service of tests/grpc_proto (``meshtest.TestService``; the example
puts ``tests/`` on ``sys.path`` to import it). ``MESHLIB_ETCD_ENDPOINTS`` selects etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import time
from concurrent import futures

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from grpc_proto import meshtest_pb2 as pb  # noqa: E402
from grpc_proto import meshtest_pb2_grpc as pb_grpc  # noqa: E402

from meshlib import Mesh  # noqa: E402
from meshlib.grpc import add_health_servicer  # noqa: E402
from meshlib.grpc.health import SERVING  # noqa: E402


class Orders(pb_grpc.TestServiceServicer):
    def __init__(self, server_id: str) -> None:
        self.server_id = server_id

    def UnaryCall(self, request, context):  # noqa: N802 - generated name
        return pb.SimpleResponse(server_id=self.server_id,
                                 payload=pb.Payload(body=b"x" * request.response_size))


def serve(args: argparse.Namespace) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TestServiceServicer_to_server(Orders(args.id), server)
    add_health_servicer(server, lambda _service: SERVING)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    with Mesh(handle_sigterm=True) as mesh:  # SIGTERM / exit deregisters
        mesh.register("orders", port, protocol="grpc", instance_id=args.id,
                      labels={"version": args.version})
        print(f"orders/{args.id} ({args.version}) serving on 127.0.0.1:{port}", flush=True)
        try:
            server.wait_for_termination()
        except KeyboardInterrupt:
            pass
    server.stop(grace=2)


def call(args: argparse.Namespace) -> None:
    with Mesh(service="example-client") as mesh:
        mesh.wait_for("orders")
        with mesh.grpc_channel("orders") as channel:
            stub = pb_grpc.TestServiceStub(channel)
            for _ in range(args.count):
                resp = stub.UnaryCall(pb.SimpleRequest(response_size=1), timeout=2.0)
                print("sync  answered by", resp.server_id)
                time.sleep(args.pause)

        async def aio_calls() -> None:
            async with mesh.async_grpc_channel("orders") as channel:
                stub = pb_grpc.TestServiceStub(channel)
                replies = await asyncio.gather(
                    *(stub.UnaryCall(pb.SimpleRequest(response_size=1), timeout=2.0)
                      for _ in range(args.count)))
                print("aio   answered by", sorted(r.server_id for r in replies))

        asyncio.run(aio_calls())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--id", default="a")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--version", default="v1")
    c = sub.add_parser("call")
    c.add_argument("--count", type=int, default=10)
    c.add_argument("--pause", type=float, default=0.0)
    args = ap.parse_args()
    serve(args) if args.cmd == "serve" else call(args)


if __name__ == "__main__":
    main()
