"""Per-request context shared by meshlib's client drivers and its server layer.

* :data:`current_deadline`: the deadline of the inbound request being served. The server
  layer (``meshlib.server``: ASGI/WSGI middleware, gRPC interceptors) sets it from the
  caller's ``x-mesh-timeout`` header or gRPC deadline; the HTTP and gRPC drivers read it, so
  outgoing mesh calls made while serving the request inherit it (the earlier of it and the
  destination's ``policy.timeout`` wins). This is gRPC's deadline propagation (gRPC
  "Deadlines" guide) and Finagle's ``Deadline`` context, carried in a ``ContextVar`` so it
  follows threads' and asyncio tasks' own contexts.
* :data:`CALLER_HEADER`: the caller identity header meshlib clients send when the process
  knows its own service name (``Mesh(service=...)``); the server layer reads it for access
  policies when no mTLS peer name is available.
"""

from __future__ import annotations

import contextvars
from typing import Final

from meshlib.core.deadline import Deadline

__all__ = ["CALLER_HEADER", "CALLER_KEY", "current_deadline"]

#: The deadline of the request being served, set by meshlib's server layer; outgoing calls
#: made while serving it inherit it (the earlier of it and the policy timeout wins).
current_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "meshlib_deadline", default=None
)

#: Caller identity header (HTTP, bytes as in ASGI/httpcore header lists).
CALLER_HEADER: Final = b"x-mesh-caller"
#: The same name as gRPC metadata key (str).
CALLER_KEY: Final = "x-mesh-caller"
