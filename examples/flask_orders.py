"""An "orders" service on Flask (WSGI) that registers itself in the mesh.

    # terminal 1: etcd (any etcd 3.5; tests use .venv/bin/etcd)
    .venv/bin/etcd --data-dir /tmp/etcd-demo
    # terminals 2 and 3: two instances (different ports; the second a v2 canary)
    .venv/bin/python examples/flask_orders.py --etcd 127.0.0.1:2379 --port 8101
    .venv/bin/python examples/flask_orders.py --etcd 127.0.0.1:2379 --port 8102 --version v2
    # then call it through the gateway (examples/fastapi_gateway.py) or any mesh client:
    #   mesh.http_client().get("http://orders/orders/42")

Routes: ``GET /orders/<id>`` (JSON naming the instance that answered), ``POST /orders``
(echoes the ``Idempotency-Key`` it received), ``GET /healthz``. The instance registers as
``orders`` with the label ``version`` on start and deregisters when it stops (Ctrl-C or
SIGTERM: the Mesh revokes its lease, so callers stop routing here at once; after a SIGKILL
the record disappears when the lease's TTL runs out, and callers' retries cover the gap).

The app runs under ``MeshWSGIMiddleware``: server metrics with Flask's route templates,
trace context continued from the caller, the caller's deadline (``x-mesh-timeout``, gRPC
``grpc-timeout`` format; expired -> 504) and this service's access policy from etcd. The
service also reports the deadline and caller it received so you can see them.

Needs ``flask`` (``pip install flask``). Werkzeug's threaded server is used for the example;
in production run the same ``app`` under any WSGI server and call ``mesh.register`` once
the port is bound.
"""

from __future__ import annotations

import argparse
import os
import socket

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from meshlib import Mesh
from meshlib.core.deadline import HTTP_TIMEOUT_HEADER, parse_timeout
from meshlib.server import MeshWSGIMiddleware

SERVICE = "orders"


def create_app(instance: str, version: str) -> Flask:
    app = Flask(__name__)

    def mesh_info() -> dict[str, object]:
        deadline_s, _problem = parse_timeout(request.headers.get(HTTP_TIMEOUT_HEADER))
        return {
            "served_by": instance,
            "version": version,
            "caller": request.headers.get("x-mesh-caller"),
            "deadline_s": deadline_s,
        }

    @app.get("/orders/<order_id>")
    def get_order(order_id: str):  # type: ignore[no-untyped-def]
        return jsonify(order_id=order_id, status="shipped", **mesh_info())

    @app.post("/orders")
    def create_order():  # type: ignore[no-untyped-def]
        body = request.get_json(silent=True) or {}
        return jsonify(created=body, idempotency_key=request.headers.get("idempotency-key"),
                       **mesh_info()), 201

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return jsonify(ok=True, served_by=instance)

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etcd", default=os.environ.get("MESHLIB_ETCD_ENDPOINTS"),
                    help="etcd endpoints, comma-separated (default: $MESHLIB_ETCD_ENDPOINTS)")
    ap.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    ap.add_argument("--version", default="v1", help="value of the 'version' label")
    ap.add_argument("--id", default=None, help="instance id (default: orders-<host>-<port>)")
    ap.add_argument("--prefix", default=None, help="etcd key prefix (default: /meshlib/v1)")
    args = ap.parse_args(argv)
    instance = args.id or f"orders-{socket.gethostname()}-{args.port}"
    app = create_app(instance, args.version)
    # this program owns its process: SIGTERM deregisters at once (the mesh's handler)
    with Mesh(args.etcd, prefix=args.prefix, service=SERVICE, handle_sigterm=True) as mesh:
        app.wsgi_app = MeshWSGIMiddleware(app.wsgi_app, mesh)  # type: ignore[method-assign]
        server = make_server("127.0.0.1", args.port, app, threaded=True)  # bound, then register
        mesh.register(SERVICE, args.port, instance_id=instance, labels={"version": args.version},
                      ttl=5)
        print(f"{instance} ({args.version}) serving on 127.0.0.1:{args.port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
