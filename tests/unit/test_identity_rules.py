"""Pure identity rules: CSR checks (one case per refusal code), SPIFFE IDs, the rate limiter,
readiness of a certificate."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshlib.identity import StaticIdentitySource, x509util
from meshlib.identity.csr_check import CsrRefused, check_csr
from meshlib.identity.ratelimit import RateLimiter
from meshlib.identity.readiness import identity_problems
from meshlib.identity.spiffe import SpiffeIdError, parse_spiffe_id, resolve_trust_domain, spiffe_id
from meshlib.identity.testing import TestCA

TD = "meshlib.local"
ID = f"spiffe://{TD}/svc/orders"


def _csr(key, sans, sign_key=None) -> bytes:  # type: ignore[no-untyped-def]
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orders")]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(sign_key or key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _tamper(pem: bytes) -> bytes:
    """Flip one byte of the signature (the last bytes of the DER)."""
    csr = x509.load_pem_x509_csr(pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    import base64

    body = base64.encodebytes(bytes(der))
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


EC = ec.generate_private_key(ec.SECP256R1())
URI = x509.UniformResourceIdentifier
DNS = x509.DNSName

CASES = {
    "not pem": (b"hello", "malformed", "CERTIFICATE REQUEST"),
    "two csrs": (_csr(EC, [URI(ID)]) * 2, "malformed", "single"),
    "garbage body": (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                     "malformed", "cannot be parsed"),
    "bad signature": (_tamper(_csr(EC, [URI(ID)])), "bad_signature", "signature"),
    "small rsa": (_csr(rsa.generate_private_key(65537, 1024), [URI(ID)]), "key_size", "1024 bits"),
    "p521": (_csr(ec.generate_private_key(ec.SECP521R1()), [URI(ID)]), "key_type", "secp521r1"),
    "no uri": (_csr(EC, [DNS("orders")]), "san", "0 URI SANs"),
    "two uris": (_csr(EC, [URI(ID), URI(f"spiffe://{TD}/svc/x")]), "san", "2 URI SANs"),
    "ip san": (_csr(EC, [URI(ID), x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1"))]),
               "san", "other than URI and DNS"),
    "foreign dns": (_csr(EC, [URI(ID), DNS("payments")]), "san", "'payments'"),
    "other service": (_csr(EC, [URI(f"spiffe://{TD}/svc/payments")]), "identity", "payments"),
    "other trust domain": (_csr(EC, [URI("spiffe://evil.org/svc/orders")]), "identity", "evil.org"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_csr_refusals(name: str) -> None:
    pem, code, text = CASES[name]
    with pytest.raises(CsrRefused) as e:
        check_csr(pem, service="orders", trust_domain=TD)
    assert e.value.code == code
    assert text in e.value.reason


def test_good_csr_is_accepted() -> None:
    pem = x509util.make_csr(x509util.generate_key(), ID, "orders")
    assert check_csr(pem, service="orders", trust_domain=TD).is_signature_valid
    pem = _csr(rsa.generate_private_key(65537, 2048), [URI(ID)])
    check_csr(pem, service="orders", trust_domain=TD)


def test_spiffe_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    assert spiffe_id(TD, "orders") == ID
    assert parse_spiffe_id(ID) == (TD, "orders")
    for bad in ("http://x/svc/a", "spiffe://meshlib.local/ns/a", "spiffe://UPPER/svc/a",
                "spiffe://td/svc/a/b"):
        with pytest.raises(SpiffeIdError):
            parse_spiffe_id(bad)
    monkeypatch.setenv("MESHLIB_TRUST_DOMAIN", "prod.example")
    assert resolve_trust_domain(None) == "prod.example"
    assert resolve_trust_domain("x.y") == "x.y"
    monkeypatch.delenv("MESHLIB_TRUST_DOMAIN")
    assert resolve_trust_domain(None) == "meshlib.local"


def test_rate_limiter_buckets_per_service() -> None:
    now = [0.0]
    rl = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert rl.allow("a") and rl.allow("a") and not rl.allow("a")
    assert rl.allow("b")  # another service has its own bucket
    now[0] += 1.0  # one token a second
    assert rl.allow("a") and not rl.allow("a")


def test_readiness_of_a_certificate() -> None:
    ca = TestCA(TD)
    assert identity_problems(None) == []
    assert identity_problems(StaticIdentitySource(ca.issue("orders"))) == []
    now = dt.datetime.now(dt.UTC)
    # 100 s leaf issued 95 s ago: 5 s left, less than a tenth
    close = ca.issue("orders", lifetime=dt.timedelta(seconds=100), now=now - dt.timedelta(seconds=95))
    (msg,) = identity_problems(StaticIdentitySource(close))
    assert msg.startswith(f"identity: certificate for {ID} expires in ")
    expired = ca.issue("orders", lifetime=dt.timedelta(seconds=10), now=now - dt.timedelta(seconds=70))
    (msg,) = identity_problems(StaticIdentitySource(expired))
    assert re.search(r"expired (60|61)s ago$", msg), msg  # not_after is whole seconds
