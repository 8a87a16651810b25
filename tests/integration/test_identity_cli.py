"""``meshctl ca init`` and ``meshlib signer`` as real processes; ``Mesh(identity=True)``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshlib.cli import main
from meshlib.identity.source import IdentityUnavailable
from meshlib.identity.verify import verify_svid
from meshlib.mesh import Mesh


def test_ca_init_writes_a_root_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(d), "--trust-domain", "example.org"]) == 0
    assert "trust domain example.org" in capsys.readouterr().out
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (d / "trust-domain").read_text().strip() == "example.org"
    assert main(["ca", "init", "--dir", str(d)]) == 2
    assert "ca.key already exists; refusing to overwrite it" in capsys.readouterr().err
    assert main(["ca", "init", "--dir", str(tmp_path / "x"), "--intermediate-cert", "a.pem"]) == 2
    assert "--intermediate-key" in capsys.readouterr().err
    assert main(["ca", "init", "--dir", str(tmp_path / "y"), "--trust-domain", "Bad Domain"]) == 2
    assert "trust domain 'Bad Domain' is invalid" in capsys.readouterr().err


def test_ca_init_takes_an_existing_intermediate(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from meshlib.identity import x509util
    from meshlib.identity.authority import Authority
    from meshlib.identity.testing import TestCA

    root = TestCA("example.org")
    key = x509util.generate_key()
    now = dt.datetime.now(dt.UTC)
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.authority.key.public_key()), critical=False)
        .sign(root.authority.key, x509util.hashes.SHA256())
    )
    (tmp_path / "inter.pem").write_bytes(x509util.cert_pem(inter))
    (tmp_path / "inter.key").write_bytes(x509util.key_pem(key))
    (tmp_path / "root.pem").write_bytes(root.bundle_pem)
    d = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(d), "--trust-domain", "example.org",
                 "--intermediate-cert", str(tmp_path / "inter.pem"),
                 "--intermediate-key", str(tmp_path / "inter.key"),
                 "--root", str(tmp_path / "root.pem")]) == 0
    authority = Authority.load(d)
    csr = x509util.make_csr(x509util.generate_key(), "spiffe://example.org/svc/orders", "orders")
    chain = authority.issue(x509.load_pem_x509_csr(csr), "orders", dt.timedelta(hours=1))
    assert len(x509util.load_certs(chain)) == 2  # leaf + intermediate
    assert verify_svid(chain, root.bundle_pem) == "spiffe://example.org/svc/orders"


def test_signer_process_serves_a_mesh_with_identity(etcd_server, etcd_prefix, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(d)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlib.cli", "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix,
         "signer", "--ca-dir", str(d), "--lifetime", "3600", "--name", "s1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        with Mesh(etcd_server.endpoint, prefix=etcd_prefix, service="orders", identity=True) as mesh:
            assert mesh.identity is not None
            creds = mesh.identity.current()
            assert creds.spiffe_id == "spiffe://meshlib.local/svc/orders"
            assert 3500 < creds.seconds_until_expiry() <= 3600
            assert verify_svid(creds.cert_chain_pem, (d / "bundle.pem").read_bytes()) == creds.spiffe_id
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "signer s1 is active" in out


def test_mesh_with_identity_and_no_signer_fails_with_the_reason(etcd_server, etcd_prefix) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IdentityUnavailable) as e:
        Mesh(etcd_server.endpoint, prefix=etcd_prefix, service="orders", identity=True,
             identity_timeout=12)
    assert "spiffe://meshlib.local/svc/orders" in str(e.value)
    assert "meshlib signer" in str(e.value)
    with pytest.raises(ValueError, match="needs service"):
        Mesh(etcd_server.endpoint, prefix=etcd_prefix, identity=True)


def test_killed_signer_process_is_replaced_by_a_standby(etcd_server, etcd_prefix, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL (no revoke): the standby takes over when the dead signer's lease expires."""
    import time

    from meshlib.discovery.etcd_client import EtcdClient
    from meshlib.identity.authority import Authority
    from meshlib.identity.keys import IdentityKeys
    from meshlib.identity.signer import Signer

    d = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(d)]) == 0
    keys = IdentityKeys(etcd_prefix)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlib.cli", "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix,
         "signer", "--ca-dir", str(d), "--lease-ttl", "2", "--name", "first"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    client = EtcdClient(etcd_server.endpoint, timeout=3)
    standby = None
    try:
        deadline = time.monotonic() + 20
        while (got := client.get(keys.leader)) is None or got[0] != b"first":
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the signer process never became active"
            time.sleep(0.05)
        standby = Signer(client, Authority.load(d), prefix=etcd_prefix, name="standby", lease_ttl=2)
        assert not standby.wait_active(0.5)
        proc.kill()
        proc.wait(10)
        assert standby.wait_active(10)  # after the 2 s lease of the dead one expired
        assert client.get(keys.leader)[0] == b"standby"  # type: ignore[index]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if standby is not None:
            standby.close()
        client.close()
