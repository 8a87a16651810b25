"""``ssl.SSLContext`` objects from mesh credentials, rebuilt on every rotation.

One module for the I/O side of mesh mTLS shared by the HTTP connections, the servers and the
shim (the decisions live in :mod:`meshlib.core.mtls`). Credentials come from an
:class:`meshlib.identity.source.IdentitySource`; a context is immutable once built and a
rotation builds a new one (``SSLContext`` objects are not meant to be changed while sockets
use them), so kept-alive connections keep the context they were made with and new ones use
the newest.

* Client contexts: TLS 1.3 only, ``CERT_REQUIRED`` against the trust bundle, ``check_hostname``
  off: the peer is checked by its SPIFFE ID (the URI SAN), not a DNS name, by
  :func:`verify_server` after the handshake (Linkerd, Istio and SPIFFE's go-spiffe ``tlsconfig``
  authorize the same way).
* Server contexts: TLS 1.3 only, the client certificate requested and verified when given
  (``CERT_OPTIONAL``; ``CERT_REQUIRED`` with ``require_client_cert``) so that a live mode
  change (permissive -> strict) is enforced per request by the server middleware. Rotation:
  the context handed to the server once has an ``sni_callback`` that switches every new
  handshake to the newest context (CPython ``SSLContext.sni_callback``: "may set
  ``ssl_socket.context`` to a new SSLContext"), which swaps the certificate and the trust store.
  Session tickets are off (``num_tickets = 0``): a resumed session would skip the client
  certificate check against a rotated bundle.

``ssl`` loads keys only from files: the chain and key are written to an anonymous in-memory
file (``memfd_create``, Linux) and loaded from ``/proc/self/fd/N``; elsewhere a private
temporary file, removed at once.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from meshlib.core.mtls import (
    HANDSHAKE,
    MtlsRefused,
    check_server_identity,
    peer_spiffe_id,
    service_of,
)
from meshlib.telemetry.metrics import MTLS_REFUSED

__all__ = [
    "ClientTLS",
    "ServerTLS",
    "client_context",
    "count_refusal",
    "handshake_refusal",
    "peer_identity",
    "server_context",
    "verify_server",
]


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """A path holding ``data`` for as long as the block runs (in memory where possible)."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd("meshlib-cred", 0)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="meshlib-cred-")
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def _load(ctx: ssl.SSLContext, creds: Any) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=creds.trust_bundle_pem.decode("ascii"))
    with _pem_file(creds.cert_chain_pem + b"\n" + creds.private_key_pem) as path:
        ctx.load_cert_chain(path)
    return ctx


def client_context(creds: Any) -> ssl.SSLContext:
    """A client context presenting ``creds`` and trusting its bundle (no host name check)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, creds)


def server_context(creds: Any, *, require_client_cert: bool = False) -> ssl.SSLContext:
    """A server context presenting ``creds``; client certificates verified against its bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.num_tickets = 0
    return _load(ctx, creds)


def count_refusal(side: str, reason: str) -> None:
    """Count a refused TLS peer (``meshlib_mtls_refused_total{side, reason}``)."""
    MTLS_REFUSED.labels(side, reason).inc()


def handshake_refusal(exc: BaseException, where: str) -> str:
    """A readable reason for a failed client handshake (counted as ``handshake``): an
    expired or untrusted server certificate, or a server that refused ours."""
    count_refusal("client", HANDSHAKE)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"mesh mTLS to {where}: server certificate refused: {exc.verify_message}"
    reason = getattr(exc, "reason", None) or exc
    return f"mesh mTLS handshake with {where} failed: {reason}"


def _uri_sans(cert: dict[str, Any] | None) -> list[str]:
    if not cert:
        return []
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


def verify_server(ssl_object: Any, expected: str) -> str:
    """After a client handshake: the server's SPIFFE ID, which must be ``expected``
    (raises :class:`~meshlib.core.mtls.MtlsRefused`)."""
    sid = peer_spiffe_id(_uri_sans(ssl_object.getpeercert()))
    check_server_identity(sid, expected)
    return sid


def peer_identity(ssl_object: Any, trust_domain: str | None = None
                  ) -> tuple[str | None, str | None]:
    """After a server handshake: ``(spiffe_id, service)`` of the verified client certificate,
    ``(None, None)`` when the client presented none, it is not a mesh identity, or (with
    ``trust_domain``) it belongs to another trust domain."""
    if ssl_object is None:
        return None, None
    cert = ssl_object.getpeercert()
    if not cert:
        return None, None
    try:
        sid = peer_spiffe_id(_uri_sans(cert))
    except MtlsRefused:
        return None, None
    if trust_domain is not None and not sid.startswith(f"spiffe://{trust_domain}/"):
        return None, None
    return sid, service_of(sid)


class _Rotating:
    """Holds the newest context built from an identity source; rebuilt on each rotation."""

    def __init__(self, source: Any, build: Callable[[Any], ssl.SSLContext]) -> None:
        self.source = source
        self._build = build
        creds = source.current()
        self.context = build(creds)
        self.spiffe_id: str = creds.spiffe_id
        self.rotations = 0
        self._lock = threading.Lock()
        self._unsubscribe = source.subscribe(self._rotated)

    def _rotated(self, creds: Any) -> None:
        ctx = self._build(creds)
        with self._lock:
            self.context = ctx
            self.spiffe_id = creds.spiffe_id
            self.rotations += 1

    def close(self) -> None:
        self._unsubscribe()


class ClientTLS(_Rotating):
    """The client side of mesh mTLS for one process: the newest client context and the
    SPIFFE ID expected of each destination service (same trust domain as our own)."""

    def __init__(self, source: Any) -> None:
        self._expected: dict[str, str] = {}
        self._targets: dict[str, tuple[ssl.SSLContext, str]] = {}
        super().__init__(source, client_context)

    def _rotated(self, creds: Any) -> None:
        super()._rotated(creds)
        self._targets = {}  # published after the new context (see target())

    def target(self, service: str) -> tuple[ssl.SSLContext, str]:
        """``(newest context, expected SPIFFE ID)`` of ``service``, cached until the next
        rotation. The cache dict is replaced after the context is: a reader holding the new
        dict can only have read the new context."""
        targets = self._targets
        t = targets.get(service)
        if t is None:
            t = targets[service] = (self.context, self.expected(service))
        return t

    def expected(self, service: str) -> str:
        """``spiffe://<our trust domain>/svc/<service>`` (cached per service)."""
        sid = self._expected.get(service)
        if sid is None:
            td = self.spiffe_id[9:].partition("/")[0]
            sid = self._expected[service] = f"spiffe://{td}/svc/{service}"
        return sid


class ServerTLS(_Rotating):
    """The server side of mesh mTLS: :attr:`front` is the one context to give a server
    (uvicorn, ``asyncio.start_server``, ``ssl.wrap_socket``); every handshake switches to the
    newest credentials through its ``sni_callback``.

    ``require_client_cert``: refuse a client without a certificate in the handshake (always
    strict). By default a certificate is verified when presented and the mode decides per
    request (:func:`meshlib.core.mtls.inbound_caller`)."""

    def __init__(self, source: Any, *, require_client_cert: bool = False) -> None:
        super().__init__(source, lambda c: server_context(
            c, require_client_cert=require_client_cert))
        self.front = server_context(source.current(), require_client_cert=require_client_cert)
        self.front.sni_callback = self._switch

    @property
    def trust_domain(self) -> str:
        """The trust domain of this server's own identity (peers must share it)."""
        return self.spiffe_id[9:].partition("/")[0]

    def _switch(self, ssl_object: Any, _server_name: str | None, _ctx: Any) -> None:
        ssl_object.context = self.context
        return None

    def uvicorn_ssl_context_factory(self, _config: Any, _default: Any) -> ssl.SSLContext:
        """``uvicorn.Config(ssl_context_factory=server_tls.uvicorn_ssl_context_factory)``."""
        return self.front
