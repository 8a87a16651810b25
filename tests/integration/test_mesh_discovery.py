"""Registration, discovery and live policies through a real etcd (issue 2)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from prometheus_client import REGISTRY

from meshlib import Mesh, MeshTimeout
from meshlib.discovery.etcd_client import EtcdClient


def _prefix() -> str:
    return f"/meshlib-test/{uuid.uuid4().hex[:10]}/v1"


def _eventually(pred, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


def _metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _spawn_registrant(endpoints: str, prefix: str, service: str, port: int, ttl: float):
    code = textwrap.dedent(
        f"""
        import sys, time
        from meshlib import Mesh
        mesh = Mesh({endpoints!r}, prefix={prefix!r})
        mesh.register({service!r}, {port}, ttl={ttl}, instance_id="child")
        print("registered", flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "registered", line
    return proc


@pytest.fixture
def prefix() -> str:
    return _prefix()


def test_register_discover_and_deregister_on_close(etcd, prefix):
    with Mesh(etcd.endpoint, prefix=prefix) as mesh:
        reg = mesh.register("orders", 8081, labels={"version": "v1"}, zone="z1", weight=50)
        snap = mesh.wait_for("orders", timeout=5)
        (ep,) = snap.endpoints
        assert (ep.address, ep.port, ep.protocol) == ("127.0.0.1", 8081, "http")
        assert dict(ep.labels) == {"version": "v1"} and ep.zone == "z1" and ep.weight == 50
        raw = json.loads(etcd.etcdctl("get", "--print-value-only", reg.key).stdout)
        assert raw["port"] == 8081
        reg.close()
        assert _eventually(lambda: len(mesh.snapshot("orders").endpoints) == 0, 3)
        assert etcd.etcdctl("get", "--print-value-only", reg.key).stdout.strip() == ""


async def test_async_wait_for(etcd, prefix):
    with Mesh(etcd.endpoint, prefix=prefix) as mesh:
        threading.Timer(0.3, lambda: mesh.register("pay", 9000)).start()
        snap = await mesh.async_wait_for("pay", timeout=5)
        assert [e.port for e in snap.endpoints] == [9000]
        with pytest.raises(MeshTimeout, match="'nobody'"):
            await mesh.async_wait_for("nobody", timeout=0.3)


def test_wait_for_times_out_with_clear_error(etcd, prefix):
    with Mesh(etcd.endpoint, prefix=prefix) as mesh, pytest.raises(MeshTimeout) as info:
        mesh.wait_for("ghost", min_endpoints=2, timeout=0.3)
    assert "ghost" in str(info.value) and "wanted 2" in str(info.value)


def test_lease_expiry_removes_a_crashed_instance(etcd, prefix):
    with Mesh(etcd.endpoint, prefix=prefix) as mesh:
        proc = _spawn_registrant(etcd.endpoint, prefix, "crashy", 7001, ttl=2)
        try:
            assert mesh.wait_for("crashy", timeout=5).endpoints[0].port == 7001
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = time.monotonic()
            assert _eventually(lambda: not mesh.snapshot("crashy").endpoints, 6)
            # etcd expires the lease after the TTL (2 s) since the last keepalive.
            assert time.monotonic() - killed < 5
        finally:
            proc.kill()


def test_reregisters_after_lease_loss(etcd, prefix):
    with Mesh(etcd.endpoint, prefix=prefix) as mesh:
        reg = mesh.register("phoenix", 7003, ttl=3)
        mesh.wait_for("phoenix", timeout=5)
        lease_hex = etcd.etcdctl("lease", "list").stdout.split()[-1]
        etcd.etcdctl("lease", "revoke", lease_hex)  # as if etcd had lost the lease
        assert _eventually(lambda: not mesh.snapshot("phoenix").endpoints, 3)
        assert _eventually(lambda: len(mesh.snapshot("phoenix").endpoints) == 1, 8)
        assert reg.registrations >= 2


def test_survives_etcd_restart_and_registration_comes_back(etcd, prefix):
    with Mesh(etcd.endpoint, prefix=prefix) as mesh:
        mesh.register("sturdy", 7004, ttl=3)
        mesh.wait_for("sturdy", timeout=5)
        etcd.kill()
        # Static stability: nothing is purged while etcd is down (checked once the mesh
        # knows it is down, not merely soon after the kill).
        assert _eventually(lambda: not mesh.connected, 5)
        assert len(mesh.snapshot("sturdy").endpoints) == 1
        assert _metric("meshlib_etcd_connected") == 0
        etcd.restart()
        assert _eventually(lambda: mesh.connected, 8)
        with EtcdClient(etcd.endpoint) as other:
            other.put(f"{prefix}/services/sturdy/instances/new", b'{"address":"127.0.0.1","port":7005}')
        assert _eventually(lambda: len(mesh.snapshot("sturdy").endpoints) == 2, 5)


def test_malformed_record_is_skipped_and_named(etcd, prefix, caplog):
    caplog.set_level(logging.WARNING, logger="meshlib.discovery")
    with Mesh(etcd.endpoint, prefix=prefix) as mesh:
        mesh.register("cart", 7010)
        mesh.wait_for("cart", timeout=5)
        before = _metric("meshlib_instance_record_rejections_total", service="cart")
        bad_key = f"{prefix}/services/cart/instances/broken"
        etcd.etcdctl("put", bad_key, '{"address": "127.0.0.1", "port": "eighty"}')
        etcd.etcdctl("put", f"{prefix}/services/cart/instances/good", '{"address":"127.0.0.1","port":7011}')
        assert _eventually(lambda: len(mesh.snapshot("cart").endpoints) == 2, 5)
        assert sorted(e.port for e in mesh.snapshot("cart").endpoints) == [7010, 7011]
        assert any(bad_key in r.getMessage() and "port" in r.getMessage() for r in caplog.records)
        assert _metric("meshlib_instance_record_rejections_total", service="cart") == before + 1


def test_policy_applies_live_and_bad_policy_is_refused(etcd, prefix, caplog):
    caplog.set_level(logging.ERROR, logger="meshlib.discovery")
    with Mesh(etcd.endpoint, prefix=prefix) as mesh:
        mesh.register("shop", 7020)
        snap = mesh.wait_for("shop", timeout=5)
        assert snap.policy.retries.attempts == 3  # defaults
        key = f"{prefix}/services/shop/policy"
        t0 = time.monotonic()
        etcd.etcdctl("put", key, "retries: {attempts: 4}\nload_balancer: {policy: round_robin}\n")
        assert _eventually(lambda: mesh.snapshot("shop").policy.retries.attempts == 4, 3, 0.002)
        applied_ms = (time.monotonic() - t0) * 1000
        assert mesh.snapshot("shop").policy.load_balancer.policy == "round_robin"
        rev = mesh.snapshot("shop").policy_revision
        assert rev > 0 and _metric("meshlib_policy_revision", service="shop") == rev

        before = _metric("meshlib_policy_rejections_total", service="shop")
        etcd.etcdctl("put", key, "retries: {attempts: 9}\nbogus: 1\n")
        assert _eventually(
            lambda: _metric("meshlib_policy_rejections_total", service="shop") == before + 1, 3
        )
        pol = mesh.snapshot("shop").policy
        assert pol.retries.attempts == 4 and pol.load_balancer.policy == "round_robin"
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert key in text and "retries.attempts" in text and "bogus" in text
        # deleting the policy key returns to the defaults
        etcd.etcdctl("del", key)
        assert _eventually(lambda: mesh.snapshot("shop").policy.retries.attempts == 3, 3)
        print(f"policy applied {applied_ms:.1f} ms after etcdctl put returned")


def test_default_policy_merges_under_service_policy(etcd, prefix):
    with Mesh(etcd.endpoint, prefix=prefix) as mesh:
        mesh.register("menu", 7030)
        mesh.wait_for("menu", timeout=5)
        etcd.etcdctl("put", f"{prefix}/defaults/policy", "timeout: 4s\nretries: {attempts: 2}\n")
        etcd.etcdctl("put", f"{prefix}/services/menu/policy", "retries: {attempts: 5}\n")
        assert _eventually(lambda: mesh.snapshot("menu").policy.retries.attempts == 5, 3)
        assert _eventually(lambda: mesh.snapshot("menu").policy.timeout == 4.0, 3)


def test_static_stability_and_restart_from_disk_snapshot(etcd, prefix, tmp_path):
    path = str(tmp_path / "snap.json")
    with Mesh(etcd.endpoint, prefix=prefix, snapshot_path=path) as mesh:
        mesh.register("inventory", 7040, ttl=30)
        etcd.etcdctl("put", f"{prefix}/services/inventory/policy", "timeout: 3s\n")
        assert _eventually(lambda: mesh.snapshot("inventory").policy.timeout == 3.0 and
                           len(mesh.snapshot("inventory").endpoints) == 1, 5)
        etcd.kill()
        # etcd is gone: the mesh keeps routing with what it knew, and reports staleness.
        assert _eventually(lambda: not mesh.connected, 5)
        assert _eventually(lambda: (mesh.staleness or 0.0) > 1.0, 5)
        assert len(mesh.snapshot("inventory").endpoints) == 1
        assert _metric("meshlib_etcd_staleness_seconds") > 1.0
        # A process restarted during the outage routes with the on-disk snapshot.
        with Mesh(etcd.endpoint, prefix=prefix, snapshot_path=path, etcd_timeout=0.5) as fresh:
            snap = fresh.snapshot("inventory")
            assert snap.from_cache and [e.port for e in snap.endpoints] == [7040]
            assert snap.policy.timeout == 3.0
        etcd.restart()  # so that the first mesh can revoke its lease on close


def test_close_leaves_no_threads(etcd, prefix):
    before = set(threading.enumerate())
    mesh = Mesh(etcd.endpoint, prefix=prefix)
    mesh.register("tidy", 7050)
    mesh.wait_for("tidy", timeout=5)
    mesh.close()
    assert _eventually(lambda: set(threading.enumerate()) <= before, 3), threading.enumerate()


def test_mesh_fixture_gives_a_ready_mesh(mesh):
    """The published ``mesh`` fixture: a Mesh on a real etcd under a prefix of its own."""
    mesh.register("fixture-svc", 7060)
    assert [e.port for e in mesh.wait_for("fixture-svc", timeout=5).endpoints] == [7060]
    assert mesh.layout.prefix.startswith("/meshlib-test/")
