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

__all__ = ["CALLER_HEADER", "CALLER_KEY", "DeadlineVar", "current_deadline"]

class DeadlineVar:
    """A ``ContextVar[Deadline | None]`` (``get``, ``set``, ``reset``, ``name``) that also
    remembers whether a deadline was ever set in this process (``ever_set``).

    The client drivers read the inherited deadline on every call; a process that never
    serves requests (a pure client) never sets one, so the drivers skip the context lookup
    while ``ever_set`` is False (one attribute read instead of a ``ContextVar.get``)."""

    __slots__ = ("_var", "ever_set")

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
            name, default=None)
        self.ever_set = False

    @property
    def name(self) -> str:
        return self._var.name

    def get(self) -> Deadline | None:
        return self._var.get()

    def set(self, value: Deadline | None) -> contextvars.Token[Deadline | None]:
        if value is not None:
            self.ever_set = True
        return self._var.set(value)

    def reset(self, token: contextvars.Token[Deadline | None]) -> None:
        self._var.reset(token)

    def __repr__(self) -> str:
        return f"<DeadlineVar {self._var.name!r} ever_set={self.ever_set}>"


#: The deadline of the request being served, set by meshlib's server layer (or by you, with
#: ``current_deadline.set(deadline)``); outgoing calls made while serving it inherit it (the
#: earlier of it and the policy timeout wins).
current_deadline: Final = DeadlineVar("meshlib_deadline")

#: Caller identity header (HTTP, bytes as in ASGI/httpcore header lists).
CALLER_HEADER: Final = b"x-mesh-caller"
#: The same name as gRPC metadata key (str).
CALLER_KEY: Final = "x-mesh-caller"
