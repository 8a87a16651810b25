"""Which TLS target (context, expected identity) an HTTP attempt connects with, if any.

The decision is :func:`meshlib.core.mtls.use_tls` on the destination's live ``mtls.mode``
(read from the current plan: a policy change in etcd applies to the next attempt) and the
endpoint's ``tls`` record field; this module only turns it into what the connection pool takes
(``meshlib.http.backends``: ``(ssl context, expected SPIFFE ID)``) and the refusal of a strict
destination without an identity into the ``ConnectError`` the call plan classifies.
"""

from __future__ import annotations

from typing import Any

import httpx

from meshlib.core.endpoints import Endpoint
from meshlib.core.mtls import MtlsRefused, use_tls
from meshlib.tls import ClientTLS, count_refusal

TLSTarget = tuple[Any, str]


def client_tls_of(mesh: Any, identity: Any = None) -> ClientTLS | None:
    """The transport's client TLS: from ``identity`` (an IdentitySource), else the mesh's
    (``mesh.identity``), else None (no identity: clear text except to strict destinations)."""
    source = identity if identity is not None else getattr(mesh, "identity", None)
    return ClientTLS(source) if source is not None else None


def tls_target(client: ClientTLS | None, route: Any, ep: Endpoint) -> TLSTarget | None:
    """``(context, expected SPIFFE ID)`` when the attempt to ``ep`` must use mesh mTLS."""
    mode = route.dest.plan().policy.mtls.mode
    if client is None and mode != "strict":
        return None  # the common clear-text case: one comparison
    try:
        if not use_tls(mode, ep.tls, client is not None):
            return None
    except MtlsRefused as exc:
        count_refusal("client", exc.reason)
        raise httpx.ConnectError(f"service {route.service!r}: {exc}") from None
    assert client is not None
    return client.target(route.service)
