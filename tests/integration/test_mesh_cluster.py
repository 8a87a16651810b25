"""Discovery against a 3-member etcd cluster: member deaths, compaction, grpc-proxy (issue 2)."""

from __future__ import annotations

import time
import uuid

from meshlib import Mesh
from meshlib.discovery.etcd_client import EtcdClient
from meshlib.testing import EtcdGrpcProxy


def _eventually(pred, timeout: float = 5.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def _record(port: int) -> bytes:
    return b'{"address": "127.0.0.1", "port": %d}' % port


def test_discovery_current_within_3s_after_each_member_dies(etcd_cluster):
    prefix = f"/meshlib-test/{uuid.uuid4().hex[:8]}/v1"
    key = f"{prefix}/services/svc/instances/"
    with Mesh(etcd_cluster.endpoints, prefix=prefix) as mesh:
        mesh.watch("svc")
        for round_no in range(3):
            victim = etcd_cluster.leader_index()
            etcd_cluster.kill(victim)
            killed = time.monotonic()
            alive = [m.endpoint for m in etcd_cluster.members if m.running]
            with EtcdClient(alive, timeout=5) as writer:
                writer.put(key + f"i{round_no}", _record(8000 + round_no))
            assert _eventually(
                lambda r=round_no: len(mesh.snapshot("svc").endpoints) == r + 1, 3.0
            ), f"round {round_no}: not current 3 s after killing member {victim}"
            print(f"round {round_no}: current {time.monotonic() - killed:.2f}s after kill")
            etcd_cluster.restart(victim)


def test_compaction_while_disconnected_relists(etcd_cluster):
    prefix = f"/meshlib-test/{uuid.uuid4().hex[:8]}/v1"
    inst = f"{prefix}/services/svc/instances/"
    first = etcd_cluster.members[0]
    others = [m.endpoint for m in etcd_cluster.members[1:]]
    with EtcdClient(others, timeout=5) as writer:
        writer.put(inst + "a", _record(9001))
        writer.put(inst + "b", _record(9002))
        with Mesh([first.endpoint], prefix=prefix) as mesh:
            assert _eventually(lambda: len(mesh.snapshot("svc").endpoints) == 2, 5)
            etcd_cluster.kill(0)  # the mesh's only member: its watch stream breaks
            writer.delete(inst + "a")
            writer.put(inst + "c", _record(9003))
            for i in range(5):
                writer.put(f"{prefix}/noise/{i}", b"x")
            etcd_cluster.compact()  # history of the delete is gone: resume is impossible
            etcd_cluster.restart(0)
            assert _eventually(
                lambda: sorted(e.port for e in mesh.snapshot("svc").endpoints) == [9002, 9003], 10
            ), mesh.snapshot("svc").endpoints


def test_discovery_through_etcd_grpc_proxy(etcd_cluster):
    prefix = f"/meshlib-test/{uuid.uuid4().hex[:8]}/v1"
    with EtcdGrpcProxy(etcd_cluster.endpoints) as proxy:
        with Mesh(proxy.endpoint, prefix=prefix) as a, Mesh(proxy.endpoint, prefix=prefix) as b:
            reg = a.register("proxied", 9100)
            assert b.wait_for("proxied", timeout=5).endpoints[0].port == 9100
            reg.close()
            assert _eventually(lambda: not b.snapshot("proxied").endpoints, 3)


def _opened(reason: str) -> float:
    from meshlib.telemetry import metrics

    return metrics.WATCH_STREAMS_OPENED.labels(reason)._value.get()


def _stopped(pid: int):
    """SIGSTOP ``pid`` for the ``with`` block; SIGCONT on the way out whatever happens."""
    import contextlib
    import os
    import signal

    @contextlib.contextmanager
    def cm():
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    return cm()


def test_sigstopped_grpc_proxy_is_left_within_the_bound(etcd_cluster):
    """Issue 10.2: two grpc-proxies; the one carrying the mesh's watch stream is SIGSTOPped (its
    TCP connections stay up, so only an unanswered probe shows it). A change written meanwhile
    is visible within ``detection_bound`` (+0.5 s to reconnect and resume) on the other proxy."""
    prefix = f"/meshlib-test/{uuid.uuid4().hex[:8]}/v1"
    inst = f"{prefix}/services/svc/instances/"
    with EtcdGrpcProxy(etcd_cluster) as p1, EtcdGrpcProxy(etcd_cluster) as p2, \
            EtcdClient(etcd_cluster.endpoints, timeout=5) as writer:
        proxies = {p1.endpoint: p1, p2.endpoint: p2}
        writer.put(inst + "a", _record(9301))
        with Mesh(list(proxies), prefix=prefix, handle_sigterm=False) as mesh:
            assert len(mesh.wait_for("svc", timeout=5).endpoints) == 1
            wm = mesh._watcher
            assert _eventually(lambda: wm.connected, 5)
            hung = proxies[wm.stream_endpoint]
            silent_before = _opened("silent")
            with _stopped(hung.pid):
                stopped = time.monotonic()
                writer.put(inst + "b", _record(9302))
                assert _eventually(
                    lambda: len(mesh.snapshot("svc").endpoints) == 2, wm.detection_bound + 0.5
                ), f"change not visible {wm.detection_bound + 0.5:.1f}s after SIGSTOP of {hung}"
                took = time.monotonic() - stopped
                assert wm.stream_endpoint != hung.endpoint
                assert _opened("silent") == silent_before + 1
            print(f"proxy SIGSTOP: change visible after {took:.2f}s (bound {wm.detection_bound}s)")


def test_sigstopped_member_carrying_the_watch_is_left_within_3s(etcd_cluster):
    """Issue 10.2: the member serving the watch stream is SIGSTOPped while two others are
    healthy; a change written meanwhile is visible within 3 s (as for a killed member)."""
    prefix = f"/meshlib-test/{uuid.uuid4().hex[:8]}/v1"
    inst = f"{prefix}/services/svc/instances/"
    with Mesh(etcd_cluster.endpoints, prefix=prefix, handle_sigterm=False) as mesh:
        mesh.watch("svc")
        wm = mesh._watcher
        assert _eventually(lambda: wm.connected and wm.stream_member_id != 0, 5)
        ids = [m.status().header.member_id for m in etcd_cluster.members]
        victim = etcd_cluster.members[ids.index(wm.stream_member_id)]
        others = [m.endpoint for m in etcd_cluster.members if m is not victim]
        assert victim.pid is not None
        with EtcdClient(others, timeout=5) as writer, _stopped(victim.pid):
            stopped = time.monotonic()
            writer.put(inst + "x", _record(9401))
            assert _eventually(lambda: len(mesh.snapshot("svc").endpoints) == 1, 3.0), (
                "change not visible 3 s after SIGSTOP of the member carrying the watch"
            )
            took = time.monotonic() - stopped
            assert wm.stream_endpoint != victim.endpoint
        print(f"member SIGSTOP: change visible after {took:.2f}s (bound {wm.detection_bound}s)")
