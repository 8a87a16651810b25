"""What the signer checks in a certificate request before it signs anything.

Each refusal is a :class:`CsrRefused` with a stable ``code`` (the metric label) and a reason an
operator can act on. The checks, in order (the first failure wins):

1. ``malformed``: the value is not one PEM ``CERTIFICATE REQUEST``.
2. ``bad_signature``: the CSR's self-signature does not verify (proof of possession of the key).
3. ``key_type``: the key is not ECDSA P-256/P-384, RSA or Ed25519.  ``key_size``: RSA below
   2048 or above 8192 bits.
4. ``san``: not exactly one URI SAN, or another SAN type than URI and DNS, or a DNS SAN other
   than the service name (X.509-SVID: exactly one URI SAN).
5. ``identity``: the URI is not ``spiffe://<trust-domain>/svc/<service>`` for the trust domain
   of this signer and the service the request was written under (the etcd key), which etcd's
   permissions tie to the writer's user.

Rate limits (``rate_limited``) are checked by the signer, per service (:mod:`.ratelimit`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshlib.identity.spiffe import spiffe_id

MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
_CURVES = (ec.SECP256R1, ec.SECP384R1)


class CsrRefused(ValueError):
    """A certificate request the signer will not sign; ``code`` names the rule."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def check_csr(pem: bytes, *, service: str, trust_domain: str) -> x509.CertificateSigningRequest:
    """Parse and validate a CSR written under ``.../csr/<service>/...``; returns it or raises."""
    if len(pem) > MAX_CSR_BYTES:
        raise CsrRefused("malformed", f"request is {len(pem)} bytes, more than {MAX_CSR_BYTES}")
    if pem.count(b"-----BEGIN CERTIFICATE REQUEST-----") != 1:
        raise CsrRefused(
            "malformed",
            "value is not one PEM certificate request (expected a single "
            "'-----BEGIN CERTIFICATE REQUEST-----' block)",
        )
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as e:
        raise CsrRefused("malformed", f"certificate request cannot be parsed: {e}") from None
    if not csr.is_signature_valid:
        raise CsrRefused(
            "bad_signature", "the request's signature does not verify with its own public key"
        )
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CURVES):
            raise CsrRefused(
                "key_type", f"EC curve {key.curve.name} is not accepted (use P-256 or P-384)"
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise CsrRefused(
                "key_size",
                f"RSA key of {key.key_size} bits is not accepted "
                f"(use {MIN_RSA_BITS}-{MAX_RSA_BITS} bits, or EC P-256)",
            )
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CsrRefused(
            "key_type", f"{type(key).__name__} keys are not accepted (use EC P-256, RSA or Ed25519)"
        )
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    except ValueError as e:
        raise CsrRefused("malformed", f"extensions cannot be parsed: {e}") from None
    uris = [n.value for n in sans if isinstance(n, x509.UniformResourceIdentifier)]
    dns = [n.value for n in sans if isinstance(n, x509.DNSName)]
    other = [n for n in sans if not isinstance(n, x509.UniformResourceIdentifier | x509.DNSName)]
    if len(uris) != 1:
        raise CsrRefused(
            "san", f"request has {len(uris)} URI SANs {uris}; an X.509-SVID has exactly one"
        )
    if other:
        raise CsrRefused(
            "san", f"request has SANs other than URI and DNS: {[str(n) for n in other]}"
        )
    if any(d != service for d in dns):
        raise CsrRefused(
            "san", f"DNS SANs {dns} are not allowed; the only DNS SAN may be {service!r}"
        )
    expected = spiffe_id(trust_domain, service)
    if uris[0] != expected:
        raise CsrRefused(
            "identity",
            f"request asks for {uris[0]!r} but was written under service {service!r}, "
            f"which may only ask for {expected!r}",
        )
    return csr
