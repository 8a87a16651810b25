"""Decisions every inbound layer shares (ASGI, WSGI, gRPC sync and aio): who is calling,
may they, and how long is left.

Order of the checks, per request (Envoy's HTTP filter chain runs RBAC before the router):

1. **Caller identity.** The mTLS peer certificate's common name when the transport gives one
   (ASGI ``scope["extensions"]["tls"]["client_cert_name"]``, WSGI ``SSL_CLIENT_S_DN_CN`` as
   Apache mod_ssl exports it, gRPC ``auth_context()["x509_common_name"]``); else the
   ``x-mesh-caller`` header that meshlib clients send when ``Mesh(service=...)`` is set; else
   ``""`` (unknown). The certificate wins because the header is a claim anyone on the network
   can make: it is only meaningful inside a trusted network or behind mTLS (Istio/Linkerd derive
   the identity from the peer certificate for the same reason).
2. **Access policy.** ``policy.access.allow`` of *this* service, read lock-free from the mesh
   snapshot of ``service`` on every request, so a change written to etcd applies to the next
   request. An unknown caller passes only when ``"*"`` is allowed. Until etcd has answered the
   snapshot carries the default policy (``allow: ["*"]``).
3. **Deadline.** ``x-mesh-timeout`` (the ``grpc-timeout`` format, see
   :mod:`meshlib.core.deadline`) or the gRPC call deadline. Zero left on arrival: refuse
   without running the application (gRPC "Deadlines" guide: a server should not start work
   the client already gave up on). Otherwise :data:`meshlib.context.current_deadline` is set
   for the handler, so its outgoing mesh calls inherit the remaining budget. A malformed
   header is ignored (logged once per value), never turned into an error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context

from meshlib.core.deadline import HTTP_TIMEOUT_HEADER, Deadline, parse_timeout
from meshlib.core.mtls import NO_CERTIFICATE, PERMISSIVE, inbound_caller
from meshlib.telemetry import semconv as sc
from meshlib.tls import count_refusal

if TYPE_CHECKING:
    from meshlib.ports import MeshPort

__all__ = [
    "EXPIRED_BODY",
    "TIMEOUT_HEADER",
    "AccessGate",
    "caller_identity",
    "common_name",
    "denied_body",
    "denied_message",
    "detach_span",
    "inbound_deadline",
    "name_span_route",
    "resolve_service",
    "unverified_body",
]

log = logging.getLogger("meshlib.server")

#: ``x-mesh-timeout`` as ASGI header name (lower-case bytes).
TIMEOUT_HEADER: Final = HTTP_TIMEOUT_HEADER.encode()
EXPIRED_BODY: Final = b'{"error": "deadline_exceeded"}'
_logged_bad_timeouts: set[str] = set()


def resolve_service(mesh: MeshPort | None, service: str | None, where: str) -> str:
    """This service's name: ``service``, else ``mesh.service``; required with a mesh (the
    access policy is the one of this service)."""
    name = service if service is not None else getattr(mesh, "service", None)
    if name:
        return name
    if mesh is not None:
        raise ValueError(
            f"{where}: no service name: pass service='orders' or create Mesh(service='orders') "
            "(the access policy applied is the one of this service)"
        )
    return ""


class AccessGate:
    """``policy.access`` of this service from the live mesh snapshot (no mesh: allow all)."""

    __slots__ = ("mesh", "service")

    def __init__(self, mesh: MeshPort | None, service: str) -> None:
        self.mesh = mesh
        self.service = service
        if mesh is not None:
            mesh.watch(service)  # start the etcd watch now, not on the first request

    def allows(self, caller: str) -> bool:
        mesh = self.mesh
        if mesh is None:
            return True
        return bool(mesh.snapshot(self.service).policy.access.allows(caller or None))

    def mode(self) -> str:
        """``mtls.mode`` of this service (live; ``permissive`` without a mesh)."""
        mesh = self.mesh
        if mesh is None:
            return PERMISSIVE
        return str(mesh.snapshot(self.service).policy.mtls.mode)

    def identify(self, header: str | bytes | None, verified: str | None) -> str | None:
        """The caller to act on (:func:`meshlib.core.mtls.inbound_caller`): the verified peer,
        else the ``x-mesh-caller`` header unless the mode is strict; ``None``: refuse (strict,
        no verified certificate; counted in ``meshlib_mtls_refused_total``)."""
        if verified:
            return verified
        caller = inbound_caller(self.mode(), None, caller_identity(header, None))
        if caller is None:
            count_refusal("server", NO_CERTIFICATE)
        return caller

    def unverified_message(self) -> str:
        return (f"mesh certificate required: mtls.mode of service {self.service!r} is strict "
                "and the caller presented no verified mesh certificate (x-mesh-caller is "
                "ignored; docs/mtls.md)")


def common_name(dn: str | bytes | None) -> str | None:
    """The CN of an RFC 4514 distinguished name (``"CN=orders,O=acme"`` -> ``"orders"``);
    a bare name (no ``=``) is returned as is. Escaped commas (``\\,``) are honoured."""
    if not dn:
        return None
    if isinstance(dn, bytes):
        dn = dn.decode("utf-8", "replace")
    if "=" not in dn:
        return dn.strip() or None
    parts: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in dn:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ",+":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    for part in parts:
        key, _, value = part.partition("=")
        if key.strip().upper() == "CN" and value.strip():
            return value.strip()
    return None


def caller_identity(header: str | bytes | None, tls_name: str | None) -> str:
    """The calling mesh service: the TLS peer name wins over the ``x-mesh-caller`` header."""
    if tls_name:
        return tls_name
    if header is None:
        return ""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    return header.strip()


def denied_message(caller: str, service: str) -> str:
    who = repr(caller) if caller else "an unidentified caller (no x-mesh-caller, no TLS peer)"
    return f"access denied: {who} may not call service {service!r} (policy access.allow)"


def unverified_body(message: str) -> bytes:
    """The small JSON body of a 403 for a caller without a verified mesh certificate."""
    return json.dumps({"error": "mtls_required", "message": message}).encode()


def denied_body(caller: str, service: str) -> bytes:
    """The small JSON body of a 403."""
    return json.dumps({
        "error": "access_denied", "caller": caller, "service": service,
        "message": denied_message(caller, service),
    }).encode()


def inbound_deadline(value: str | bytes | None,
                     now: Callable[[], float] = time.monotonic) -> tuple[Deadline | None, bool]:
    """``(deadline, expired)`` from an ``x-mesh-timeout`` value; ``(None, False)`` when absent
    or malformed (logged once per distinct value)."""
    if value is None:
        return None, False
    seconds, problem = parse_timeout(value)
    if seconds is None:
        text = repr(value)
        if text not in _logged_bad_timeouts and len(_logged_bad_timeouts) < 100:
            _logged_bad_timeouts.add(text)
            log.warning("ignoring %s header %s: %s", HTTP_TIMEOUT_HEADER, text, problem)
        return None, False
    if seconds <= 0:
        return None, True
    return Deadline(now() + seconds), False


def name_span_route(span: Any, method: str | bytes, route: str) -> None:
    """Set ``http.route`` and rename the span ``"GET /orders/{id}"`` (semconv HTTP span
    name), once the framework has matched the route (after the span started)."""
    span.set_route(route)
    otel_span = getattr(span, "span", None)
    if otel_span is not None:
        label = sc.http_method_label(method)
        otel_span.update_name(f"{'HTTP' if label == sc.OTHER else label} {route}")


def detach_span(span: Any) -> None:
    """Stop the server span being current without ending it (WSGI iterates the response body
    after the application returned, possibly long after; the span ends at ``close()``).

    Uses the token ``attach()`` stored: :mod:`meshlib.telemetry.tracing` has no public
    ``detach`` yet."""
    token = getattr(span, "_token", None)
    if token is not None:
        otel_context.detach(token)
        span._token = None
