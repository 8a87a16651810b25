"""A signing CA held in memory: its certificate, key, chain to the root and the trust bundle.

The CA lives in a directory (``meshctl ca init --dir DIR``)::

    DIR/ca.key      the signing key (PKCS#8 PEM, mode 0600); never copied to etcd
    DIR/ca.crt      the signing certificate (a root, or an intermediate given to ``ca init``)
    DIR/chain.pem   certificates between ca.crt and the root (empty for a root), sent with leaves
    DIR/bundle.pem  the trust bundle published in etcd: every root peers accept (several
                    during a CA rotation)
    DIR/trust-domain  the trust domain this CA signs for (one line)
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from meshlib.identity import x509util
from meshlib.identity.spiffe import resolve_trust_domain
from meshlib.identity.spiffe import spiffe_id as make_spiffe_id


class CAFilesError(ValueError):
    """The CA directory is missing a file or holds something unusable."""


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: x509util.PrivateKey
    chain: tuple[x509.Certificate, ...]
    bundle_pem: bytes
    trust_domain: str

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        service: str,
        lifetime: dt.timedelta,
        now: dt.datetime | None = None,
    ) -> bytes:
        """The PEM chain (leaf, then ca.crt unless it is the root, then chain.pem)."""
        leaf = x509util.issue_leaf(
            csr,
            ca_cert=self.cert,
            ca_key=self.key,
            spiffe_id=make_spiffe_id(self.trust_domain, service),
            dns_name=service,
            lifetime=lifetime,
            now=now,
        )
        issuer_chain = [] if self.is_root else [self.cert, *self.chain]
        return x509util.certs_pem([leaf, *issuer_chain])

    @property
    def is_root(self) -> bool:
        return self.cert.issuer == self.cert.subject

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, directory: str | Path, trust_domain: str | None = None) -> Authority:
        """Load a CA directory; the trust domain comes from ``DIR/trust-domain`` when not given
        (and must agree with it when both are)."""
        d = Path(directory)
        td_file = d / "trust-domain"
        recorded = td_file.read_text().strip() if td_file.is_file() else None
        if trust_domain and recorded and trust_domain != recorded:
            raise CAFilesError(
                f"CA directory {d} signs for trust domain {recorded!r}, not {trust_domain!r}"
            )
        trust_domain = resolve_trust_domain(trust_domain or recorded)
        files = {n: d / n for n in ("ca.key", "ca.crt", "bundle.pem")}
        for name, path in files.items():
            if not path.is_file():
                raise CAFilesError(
                    f"CA directory {d}: {name} is missing (create the CA with "
                    f"'meshctl ca init --dir {d}')"
                )
        try:
            key = x509util.load_key(files["ca.key"].read_bytes())
            cert = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
            chain_path = d / "chain.pem"
            chain = x509util.load_certs(chain_path.read_bytes()) if chain_path.is_file() and chain_path.read_bytes().strip() else []
            bundle = files["bundle.pem"].read_bytes()
            x509util.load_certs(bundle)
        except ValueError as e:
            raise CAFilesError(f"CA directory {d}: {e}") from e
        if not x509util.same_public_key(key.public_key(), cert.public_key()):
            raise CAFilesError(f"CA directory {d}: ca.key does not belong to ca.crt")
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            raise CAFilesError(f"CA directory {d}: ca.crt is not a CA certificate (basicConstraints CA=false)")
        return cls(cert=cert, key=key, chain=tuple(chain), bundle_pem=bundle, trust_domain=trust_domain)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_ca_dir(
    directory: str | Path,
    trust_domain: str,
    *,
    lifetime: dt.timedelta = dt.timedelta(days=365),
    intermediate_cert: bytes | None = None,
    intermediate_key: bytes | None = None,
    root_bundle: bytes | None = None,
    also_trust: bytes | None = None,
) -> Path:
    """Create a CA directory: a new root, or an existing intermediate with its root bundle.

    ``also_trust`` adds roots to bundle.pem (the old root during a CA rotation). Refuses to
    overwrite existing files, so an operator cannot lose a CA key by running init twice.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    resolve_trust_domain(trust_domain)
    for name in ("ca.key", "ca.crt", "chain.pem", "bundle.pem", "trust-domain"):
        if (d / name).exists():
            raise CAFilesError(f"CA directory {d}: {name} already exists; refusing to overwrite it")
    extra = also_trust or b""
    if extra:
        x509util.load_certs(extra)
    if intermediate_cert is not None:
        if intermediate_key is None or root_bundle is None:
            raise CAFilesError("an intermediate needs its key (--key) and the root bundle (--root)")
        certs = x509util.load_certs(intermediate_cert)
        key = x509util.load_key(intermediate_key)
        x509util.load_certs(root_bundle)
        _write(d / "ca.key", x509util.key_pem(key), 0o600)
        _write(d / "ca.crt", x509util.cert_pem(certs[0]))
        _write(d / "chain.pem", x509util.certs_pem(certs[1:]))
        _write(d / "bundle.pem", root_bundle + extra)
    else:
        key = x509util.generate_key()
        root = x509util.make_root(key, trust_domain, lifetime=lifetime)
        _write(d / "ca.key", x509util.key_pem(key), 0o600)
        _write(d / "ca.crt", x509util.cert_pem(root))
        _write(d / "chain.pem", b"")
        _write(d / "bundle.pem", x509util.cert_pem(root) + extra)
    _write(d / "trust-domain", trust_domain.encode() + b"\n")
    Authority.load(d, trust_domain)  # proves the files are consistent
    return d
