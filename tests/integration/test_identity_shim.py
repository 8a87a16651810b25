"""The shim with ``--identity on``: a certificate from the signer, its expiry on /metrics, and
/ready turning 503 when the certificate nears expiry because the signer is gone, 200 again once
the signer is back and renewal catches up."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from shim_harness import ShimProcess

from meshlib.discovery.etcd_client import EtcdClient
from meshlib.identity.authority import Authority
from meshlib.identity.signer import Signer
from meshlib.identity.testing import TestCA


def test_shim_identity_ready_and_expiry(etcd_server, etcd_prefix, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    authority = Authority.load(TestCA().write_dir(tmp_path / "ca"))
    client = EtcdClient(etcd_server.endpoint, timeout=3)
    # 8 s certificates: renewal after ~4 s; /ready fails in the last tenth (0.8 s)
    lifetime = dt.timedelta(seconds=8)
    signer = Signer(client, authority, prefix=etcd_prefix, lifetime=lifetime)
    assert signer.wait_active(10)
    shim = ShimProcess(etcd_server.endpoint, etcd_prefix, "--service", "orders",
                       "--identity", "on", wait="/ready")
    try:
        status, body = shim.admin("/metrics")
        assert status == 200
        line = next(ln for ln in body.decode().splitlines()
                    if ln.startswith('meshlib_identity_cert_expiry_seconds{service="orders"}'))
        assert 0 < float(line.split()[-1]) <= 8
        signer.close()  # no renewals from now on: the certificate runs out
        shim.wait_status("/ready", 503, timeout=15)
        missing = json.loads(shim.admin("/ready")[1])["missing"]
        assert any(m.startswith("identity: certificate for spiffe://meshlib.local/svc/orders ")
                   and ("expires in" in m or "expired" in m) for m in missing), missing
        signer = Signer(client, authority, prefix=etcd_prefix, lifetime=lifetime)
        shim.wait_status("/ready", 200, timeout=15)  # renewal caught up
    finally:
        shim.close()
        signer.close()
        client.close()


def test_shim_identity_needs_a_service(etcd_server, etcd_prefix) -> None:  # type: ignore[no-untyped-def]
    shim = ShimProcess(etcd_server.endpoint, etcd_prefix, "--identity", "on", wait="")
    try:
        assert shim.proc.wait(20) == 2
        assert "--identity on: needs --service NAME" in shim.log()
    finally:
        shim.close()
