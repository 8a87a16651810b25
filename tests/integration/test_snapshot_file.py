"""Mesh(snapshot_path=...) against a real etcd: the file is written off the watch thread,
coalesced (a 300-service initial load costs a couple of writes, not 300), kept current after a
change, written at close, and read back by a process that starts while etcd is down."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from etcd3.etcdrpc import rpc_pb2

from meshlib import Mesh
from meshlib.discovery.etcd_client import EtcdClient


def _eventually(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def _record(port: int) -> bytes:
    return b'{"address": "127.0.0.1", "port": %d}' % port


def test_snapshot_file_is_coalesced_current_and_written_at_close(etcd, tmp_path: Path) -> None:
    prefix = f"/meshlib-test/{uuid.uuid4().hex[:8]}/v1"
    path = tmp_path / "mesh-snapshot.json"
    services = [f"svc-{i:03d}" for i in range(300)]
    with EtcdClient(etcd.endpoints, timeout=5) as c:
        ops = [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
                key=f"{prefix}/services/{s}/instances/i{j}".encode(), value=_record(9000 + j)))
            for s in services for j in range(2)
        ]
        for i in range(0, len(ops), 100):
            c.kv.Txn(rpc_pb2.TxnRequest(success=ops[i:i + 100]), timeout=10)
        with Mesh(etcd.endpoint, prefix=prefix, snapshot_path=str(path),
                  snapshot_interval=0.5, handle_sigterm=False) as mesh:
            for s in services:
                mesh.watch(s)
            assert _eventually(lambda: all(len(mesh.snapshot(s).endpoints) == 2
                                           for s in services), 20)
            writer = mesh.store._writer
            assert writer is not None
            assert writer.wait_written(5)
            # 300 services swapped in: a handful of writes (one per 0.5 s), not 300.
            assert 1 <= writer.writes <= 10, writer.writes
            doc = json.loads(path.read_text())
            assert doc["format"] == "meshlib-snapshot/1" and doc["prefix"] == prefix
            assert len(doc["services"]) == 300
            before = writer.writes
            c.put(f"{prefix}/services/svc-007/instances/i9", _record(9009))
            assert _eventually(lambda: len(mesh.snapshot("svc-007").endpoints) == 3, 5)
            assert writer.wait_written(5) and writer.writes > before
            inst = json.loads(path.read_text())["services"]["svc-007"]["instances"]
            assert sorted(r["port"] for r in inst.values()) == [9000, 9001, 9009]
            writer.interval = 60.0  # the next write would come only at close
            c.put(f"{prefix}/services/svc-008/instances/i9", _record(9109))
            assert _eventually(lambda: len(mesh.snapshot("svc-008").endpoints) == 3, 5)
        inst = json.loads(path.read_text())["services"]["svc-008"]["instances"]
        assert sorted(r["port"] for r in inst.values()) == [9000, 9001, 9109]
    etcd.kill()
    with Mesh(etcd.endpoint, prefix=prefix, snapshot_path=str(path), etcd_timeout=0.5,
              handle_sigterm=False) as fresh:
        snap = fresh.snapshot("svc-008")
        assert snap.from_cache and sorted(e.port for e in snap.endpoints) == [9000, 9001, 9109]
        assert len(fresh.store.services()) == 300
    assert [p.name for p in tmp_path.iterdir()] == ["mesh-snapshot.json"]
