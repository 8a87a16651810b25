"""A FastAPI (ASGI) gateway that calls the "orders" service through the mesh.

    # with etcd and one or more examples/flask_orders.py instances running:
    .venv/bin/python examples/fastapi_gateway.py --etcd 127.0.0.1:2379 --port 8100
    curl http://127.0.0.1:8100/api/orders/42
    curl -X POST -H 'Idempotency-Key: k1' -d '{"item": "book"}' http://127.0.0.1:8100/api/orders

What it shows:

* one ``mesh.async_http_client()`` for the whole app (created in the lifespan, closed at
  shutdown); ``http://orders/...`` is balanced over the registered instances, retried on
  another instance when one fails, under the live policy of ``orders`` in etcd;
* the gateway registers itself as ``gateway`` and calls as ``Mesh(service="gateway")``, so
  upstreams receive ``x-mesh-caller: gateway``;
* ``MeshASGIMiddleware``: server metrics under the same conventions (route templates, never
  raw paths), trace context continued from the caller, the incoming ``x-mesh-timeout``
  deadline honoured (expired -> 504) and inherited by the calls made while serving the request
  (they get the earlier of it and the policy timeout and pass the remainder on), and the
  gateway's own access policy from etcd enforced;
* mesh failures (``meshlib.http`` errors, subclasses of httpx's) become 503 (or 504 for a
  deadline) with the mesh's message, which names the service and why.

Needs ``fastapi`` and ``uvicorn`` (``pip install fastapi uvicorn``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from meshlib import Mesh
from meshlib.discovery.registration import Registration
from meshlib.http import DeadlineExceededError, MeshHTTPError
from meshlib.server import MeshASGIMiddleware

SERVICE = "gateway"
ORDERS = "http://orders"


def create_app(mesh: Mesh, register: Callable[[], Registration] | None = None) -> FastAPI:
    """The app; ``register`` is called once it is ready to serve, and its registration is
    closed (deregistered) first thing at shutdown, before in-flight requests drain."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with mesh.async_http_client(timeout=10.0) as client:
            app.state.orders = client
            reg = register() if register is not None else None
            try:
                yield
            finally:
                if reg is not None:
                    reg.close()

    app = FastAPI(title="gateway", lifespan=lifespan)

    app.add_middleware(MeshASGIMiddleware, mesh=mesh, service=SERVICE)

    @app.exception_handler(MeshHTTPError)
    async def mesh_error(_request: Request, exc: MeshHTTPError) -> JSONResponse:
        status = 504 if isinstance(exc, DeadlineExceededError) else 503
        return JSONResponse({"error": exc.reason, "service": exc.service, "detail": str(exc)},
                            status_code=status)

    @app.exception_handler(httpx.TransportError)
    async def upstream_error(_request: Request, exc: httpx.TransportError) -> JSONResponse:
        notes = getattr(exc, "__notes__", [])  # e.g. "meshlib: service 'orders', 3 attempt(s)"
        return JSONResponse({"error": type(exc).__name__, "detail": " ".join([str(exc), *notes])},
                            status_code=502)

    def relay(r: httpx.Response) -> JSONResponse:
        return JSONResponse({"gateway": SERVICE, "upstream_status": r.status_code,
                             "order": r.json() if r.headers.get("content-type", "")
                             .startswith("application/json") else r.text},
                            status_code=r.status_code)

    @app.get("/api/orders/{order_id}")
    async def get_order(order_id: str, request: Request) -> JSONResponse:
        r = await request.app.state.orders.get(f"{ORDERS}/orders/{order_id}")
        return relay(r)

    @app.post("/api/orders")
    async def create_order(request: Request) -> JSONResponse:
        headers: dict[str, Any] = {}
        key = request.headers.get("idempotency-key")
        if key:
            headers["idempotency-key"] = key  # lets the policy retry this POST
        r = await request.app.state.orders.post(f"{ORDERS}/orders", content=await request.body(),
                                                headers={"content-type": "application/json",
                                                         **headers})
        return relay(r)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "orders_endpoints": len(mesh.snapshot("orders").endpoints)}

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etcd", default=os.environ.get("MESHLIB_ETCD_ENDPOINTS"),
                    help="etcd endpoints, comma-separated (default: $MESHLIB_ETCD_ENDPOINTS)")
    ap.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    ap.add_argument("--prefix", default=None, help="etcd key prefix (default: /meshlib/v1)")
    args = ap.parse_args(argv)
    # Bind and listen first, register once the app is ready: a caller never finds the
    # gateway in etcd before it can accept connections.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown, then it re-raises the signal):
    # the lifespan deregisters during that shutdown.
    with Mesh(args.etcd, prefix=args.prefix, service=SERVICE, handle_sigterm=False) as mesh:
        mesh.watch("orders")

        def register() -> Registration:
            reg = mesh.register(SERVICE, args.port, instance_id=f"gateway-{args.port}", ttl=5)
            print(f"gateway serving on 127.0.0.1:{args.port}", flush=True)
            return reg

        app = create_app(mesh, register=register)
        config = uvicorn.Config(app, log_level="warning")
        uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
