"""An in-memory test CA that issues real X.509-SVIDs (no etcd, no signer).

For tests of TLS code that needs mesh credentials before (or without) the signer::

    ca = TestCA()                                    # trust domain "meshlib.local"
    creds = ca.issue("orders")                       # Credentials for spiffe://meshlib.local/svc/orders
    source = StaticIdentitySource(creds)
    source.set(ca.issue("orders"))                   # a rotation: subscribers are told
    old = ca.issue("orders", lifetime=timedelta(seconds=1), now=past)   # an expired one
    ca2 = TestCA(); both = ca.bundle_pem + ca2.bundle_pem                # a CA rotation bundle

It uses exactly the issuance code of the signer (:class:`meshlib.identity.authority.Authority`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from meshlib.identity import x509util
from meshlib.identity.authority import Authority, init_ca_dir
from meshlib.identity.source import Credentials
from meshlib.identity.spiffe import DEFAULT_TRUST_DOMAIN, spiffe_id


class TestCA:
    """A root CA in memory; :meth:`issue` makes credentials for any service."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        lifetime: dt.timedelta = dt.timedelta(days=1),
        now: dt.datetime | None = None,
    ) -> None:
        key = x509util.generate_key()
        cert = x509util.make_root(key, trust_domain, lifetime=lifetime, now=now)
        self.trust_domain = trust_domain
        self.authority = Authority(
            cert=cert, key=key, chain=(), bundle_pem=x509util.cert_pem(cert), trust_domain=trust_domain
        )

    @property
    def bundle_pem(self) -> bytes:
        """This CA's root certificate (PEM): the trust bundle."""
        return self.authority.bundle_pem

    def issue(
        self,
        service: str,
        *,
        lifetime: dt.timedelta = dt.timedelta(hours=1),
        now: dt.datetime | None = None,
        trust_bundle_pem: bytes | None = None,
    ) -> Credentials:
        """Fresh key + leaf for ``service``; ``now`` in the past makes an expired certificate."""
        key = x509util.generate_key()
        csr = x509util.make_csr(key, spiffe_id(self.trust_domain, service), service)
        chain = self.authority.issue(x509.load_pem_x509_csr(csr), service, lifetime, now=now)
        leaf = x509util.load_certs(chain)[0]
        return Credentials(
            cert_chain_pem=chain,
            private_key_pem=x509util.key_pem(key),
            trust_bundle_pem=trust_bundle_pem if trust_bundle_pem is not None else self.bundle_pem,
            spiffe_id=spiffe_id(self.trust_domain, service),
            not_after=leaf.not_valid_after_utc,
            not_before=leaf.not_valid_before_utc,
        )

    def write_dir(self, directory: str | Path) -> Path:
        """Write this CA as a CA directory the signer can load (``meshlib signer --ca-dir``)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "ca.key").write_bytes(x509util.key_pem(self.authority.key))
        (d / "ca.key").chmod(0o600)
        (d / "ca.crt").write_bytes(x509util.cert_pem(self.authority.cert))
        (d / "chain.pem").write_bytes(b"")
        (d / "bundle.pem").write_bytes(self.bundle_pem)
        (d / "trust-domain").write_text(self.trust_domain + "\n")
        return d


__all__ = ["TestCA", "init_ca_dir"]
