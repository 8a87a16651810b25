"""The inbound side of the mesh: what a service does with the requests it receives.

* :class:`MeshASGIMiddleware` (Starlette, FastAPI, any ASGI 3 app),
* :class:`MeshWSGIMiddleware` (Flask, Django, any WSGI app),
* :class:`MeshServerInterceptor` / :class:`AioMeshServerInterceptor` (grpcio sync / aio).

Each records server metrics with bounded labels, continues the caller's trace in a SERVER
span, enforces this service's ``policy.access`` from etcd, refuses requests whose deadline has
passed and propagates the rest of the deadline to outgoing mesh calls. Shared decisions are in
:mod:`meshlib.server.common`; see docs/server.md. The gRPC interceptors are imported on first
use, so an ASGI or WSGI service does not pay for importing grpcio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshlib.server.asgi import MeshASGIMiddleware
from meshlib.server.wsgi import MeshWSGIMiddleware

if TYPE_CHECKING:
    from meshlib.server.grpc import AioMeshServerInterceptor, MeshServerInterceptor

__all__ = [
    "AioMeshServerInterceptor",
    "MeshASGIMiddleware",
    "MeshServerInterceptor",
    "MeshWSGIMiddleware",
]


def __getattr__(name: str) -> Any:
    if name in ("MeshServerInterceptor", "AioMeshServerInterceptor"):
        from meshlib.server import grpc as _grpc

        return getattr(_grpc, name)
    raise AttributeError(f"module 'meshlib.server' has no attribute {name!r}")
