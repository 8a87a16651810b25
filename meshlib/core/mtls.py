"""Mutual TLS mode decisions: when a client speaks TLS, and whom a server believes.

The mode is Istio's PeerAuthentication mode, set per service in its policy (``mtls.mode``,
docs/policy.md) and read from the live snapshot on every call, so a change written to etcd
applies to the next connection and the next request:

* ``off``: clear text. Clients never start TLS; servers take the caller from the
  ``x-mesh-caller`` header (a claim, as before identities existed) unless a verified peer
  certificate is present anyway.
* ``permissive`` (the default, as in Istio): clients with a mesh identity speak TLS to the
  instances that advertise it in their record (``"tls": true``, docs/etcd-layout.md) and clear
  text to the others; servers accept callers with and without a certificate; a verified peer
  identity wins over the header.
* ``strict``: clients speak TLS to every instance (and fail the attempt with a clear reason when
  they have no identity); servers accept only callers with a verified mesh certificate and
  ignore ``x-mesh-caller`` entirely (a forged header changes nothing).

The peer identity is the single URI SAN ``spiffe://<trust-domain>/svc/<service>`` of the
peer's verified X.509-SVID (SPIFFE X509-SVID spec, section 2: exactly one URI SAN). The
client checks that the server's identity names the destination service (not a DNS name:
Linkerd and Istio verify the workload identity, never the host name).

Pure functions only: no ``ssl``, sockets or threads here (drivers do the I/O).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

Mode = Literal["off", "permissive", "strict"]
OFF: Final = "off"
PERMISSIVE: Final = "permissive"
STRICT: Final = "strict"
MODES: Final = (OFF, PERMISSIVE, STRICT)

# Reasons a TLS peer is refused (the ``reason`` label of meshlib_mtls_refused_total).
NO_IDENTITY: Final = "no_identity"  # strict destination, this process has no certificate
NO_CERTIFICATE: Final = "no_certificate"  # strict server, caller presented none
WRONG_IDENTITY: Final = "wrong_identity"  # verified, but not the destination service
BAD_IDENTITY: Final = "bad_identity"  # not exactly one spiffe:// URI SAN
HANDSHAKE: Final = "handshake"  # chain not trusted, expired, protocol failure


class MtlsRefused(Exception):  # noqa: N818 (a refusal, named for what happened)
    """A TLS peer was refused; ``reason`` is one of the reason constants above."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def use_tls(mode: str, endpoint_tls: bool, have_identity: bool) -> bool:
    """Whether a client connects to an endpoint with TLS.

    ``strict`` without an identity raises :class:`MtlsRefused` (``no_identity``): sending
    clear text to a strict destination would be refused by it anyway, and silently falling
    back would hide the misconfiguration."""
    if mode == OFF:
        return False
    if mode == STRICT:
        if not have_identity:
            raise MtlsRefused(NO_IDENTITY, (
                "mtls.mode is strict for this destination but this process has no mesh "
                "identity (create the Mesh with identity enabled, docs/mtls.md)"))
        return True
    return endpoint_tls and have_identity


def peer_spiffe_id(uri_sans: Iterable[str]) -> str:
    """The one ``spiffe://`` URI SAN of a verified peer certificate, else
    :class:`MtlsRefused` (``bad_identity``)."""
    ids = [u for u in uri_sans if u.startswith("spiffe://")]
    if len(ids) != 1:
        raise MtlsRefused(BAD_IDENTITY, (
            f"peer certificate carries {len(ids)} spiffe:// URI SANs ({', '.join(ids) or 'none'});"
            " an X509-SVID has exactly one"))
    return ids[0]


def service_of(spiffe_id: str) -> str | None:
    """``orders`` for ``spiffe://<td>/svc/orders``; None for anything else."""
    if not spiffe_id.startswith("spiffe://"):
        return None
    _td, sep, path = spiffe_id[9:].partition("/")
    head, sep2, name = path.partition("/")
    if not sep or head != "svc" or not sep2 or not name or "/" in name:
        return None
    return name


def check_server_identity(spiffe_id: str, expected: str) -> None:
    """The client's check: the server's verified SPIFFE ID must be ``expected`` (the
    destination service's ID in this trust domain), else :class:`MtlsRefused`."""
    if spiffe_id != expected:
        raise MtlsRefused(WRONG_IDENTITY, (
            f"server presented identity {spiffe_id!r}, expected {expected!r}: the instance "
            "is registered under a service whose certificate it does not hold"))


def inbound_caller(mode: str, verified: str | None, header: str) -> str | None:
    """The caller identity a server acts on: the verified peer's service, else (not strict)
    the ``x-mesh-caller`` header; ``None`` means refuse (strict and no verified peer).

    ``verified`` is the peer's service name from its verified certificate (or None)."""
    if verified:
        return verified
    if mode == STRICT:
        return None
    return header
