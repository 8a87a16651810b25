"""Verify a peer's X.509-SVID chain against a trust bundle, with reasons a person can act on.

Chain building and path validation are ``cryptography.x509.verification`` (RFC 5280 as the
WebPKI profile of the Rust ``x509-verification`` crate): ``PolicyBuilder().store(roots)
.time(now).build_client_verifier().verify(leaf, intermediates)``. Before that we check the
conditions people hit most (expired, not yet valid, no SPIFFE ID, wrong identity) ourselves, so
the refusal says which one and with the dates, instead of a generic path-building error.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.x509 import verification

from meshlib.identity.x509util import load_certs, uri_sans


class SvidRejected(ValueError):
    """A peer certificate that is not a valid mesh identity; ``code`` is a metric label."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def verify_svid(
    chain: bytes | list[x509.Certificate],
    bundle_pem: bytes,
    *,
    expected_spiffe_id: str | None = None,
    now: dt.datetime | None = None,
) -> str:
    """The verified SPIFFE ID of ``chain`` (leaf first), or :class:`SvidRejected`."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        certs = load_certs(chain) if isinstance(chain, bytes) else list(chain)
        roots = load_certs(bundle_pem)
    except ValueError as e:
        raise SvidRejected("malformed", f"certificate or bundle cannot be parsed: {e}") from None
    if not certs:
        raise SvidRejected("malformed", "no certificate presented")
    leaf = certs[0]
    if now > leaf.not_valid_after_utc:
        raise SvidRejected(
            "expired",
            f"certificate {_name(leaf)} expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} "
            f"({(now - leaf.not_valid_after_utc).total_seconds():.0f}s ago)",
        )
    if now < leaf.not_valid_before_utc:
        raise SvidRejected(
            "not_yet_valid",
            f"certificate {_name(leaf)} is valid only from "
            f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} (check the clocks)",
        )
    uris = uri_sans(leaf)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise SvidRejected(
            "no_spiffe_id", f"certificate {_name(leaf)} has URI SANs {uris}, not one SPIFFE ID"
        )
    if expected_spiffe_id is not None and uris[0] != expected_spiffe_id:
        raise SvidRejected(
            "wrong_identity",
            f"certificate is for {uris[0]!r}, expected {expected_spiffe_id!r}",
        )
    store = verification.Store(roots)
    verifier = verification.PolicyBuilder().store(store).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, certs[1:])
    except verification.VerificationError as e:
        raise SvidRejected(
            "untrusted", f"certificate for {uris[0]!r} does not chain to the trust bundle: {e}"
        ) from None
    return uris[0]


def _name(cert: x509.Certificate) -> str:
    uris = uri_sans(cert)
    return repr(uris[0]) if uris else cert.subject.rfc4514_string()
