"""Counting gRPC attempts that failed because mesh mTLS refused the server.

grpcio's client verifies the server inside its C core and reports a refused handshake only as
``UNAVAILABLE`` with a text ("... Hostname Verification Check failed", "... Handshake failed
... certificate has expired"); this module reads that text for the reason label of
``meshlib_mtls_refused_total{side="client"}`` (the HTTP client counts its refusals where it
makes them, in ``meshlib.tls``). Called only for failed, uncommitted attempts.
"""

from __future__ import annotations

from typing import Any

from meshlib.core.mtls import HANDSHAKE, WRONG_IDENTITY
from meshlib.tls import count_refusal

_HOSTNAME = "hostname verification check failed"  # grpc core, ssl_transport_security
_HANDSHAKE = ("handshake failed", "certificate_verify_failed", "ssl_error", "tls")


def tls_refusal_reason(details: str | None) -> str | None:
    """``wrong_identity`` / ``handshake`` for an UNAVAILABLE text caused by mesh mTLS."""
    if not details:
        return None
    text = details.lower()
    if _HOSTNAME in text:
        return WRONG_IDENTITY
    if any(k in text for k in _HANDSHAKE):
        return HANDSHAKE
    return None


def count_tls_refusal(err: Any) -> None:
    """Count ``err`` (a failed attempt's ``RpcError``) when mesh mTLS refused the server."""
    try:
        details = err.details()
    except Exception:  # an error without details (aio's cancelled calls)
        return
    reason = tls_refusal_reason(details)
    if reason is not None:
        count_refusal("client", reason)
