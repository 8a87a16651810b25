"""SnapshotFileWriter on real files: coalesced, atomic, bounded, flushed at close, and honest
about write errors (the store's export is a plain function here: pure data, no etcd)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshlib.discovery.snapshot_file import FORMAT, SnapshotFileWriter, read_snapshot_file
from meshlib.telemetry import metrics


class FakeStore:
    """What SnapshotStore._export returns, from a dict; counts what was exported."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}
        self.exported: list[set[str] | None] = []
        self.lock = threading.Lock()

    def export(self, names: set[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        with self.lock:
            self.exported.append(None if names is None else set(names))
            keys = list(self.services) if names is None else names
            return {"timeout": "1s"}, {n: self.services.get(n) for n in keys}

    def set(self, name: str, port: int) -> None:
        with self.lock:
            self.services[name] = {
                "instances": {f"/p/services/{name}/instances/i": json.dumps(
                    {"address": "127.0.0.1", "port": port})},
                "policy": None, "policy_revision": 0,
            }


def _wait(pred: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def _writes(result: str) -> float:
    return metrics.SNAPSHOT_FILE_WRITES.labels(result)._value.get()


def test_a_burst_of_changes_costs_one_write_per_interval(tmp_path: Path) -> None:
    store = FakeStore()
    path = tmp_path / "snap.json"
    w = SnapshotFileWriter(str(path), "/p", store.export, interval=0.5)
    try:
        for i in range(1000):
            store.set(f"svc-{i % 100:03d}", 8000 + i)
            w.mark(f"svc-{i % 100:03d}")
        t0 = time.monotonic()
        assert w.wait_written(3)
        assert w.writes <= 2, w.writes  # 1,000 marks: at most one write now, one after 0.5 s
        assert time.monotonic() - t0 < 1.5
        doc = read_snapshot_file(str(path), "/p")
        assert doc is not None and doc["format"] == FORMAT and len(doc["services"]) == 100
        assert doc["services"]["svc-099"]["instances"]["/p/services/svc-099/instances/i"][
            "port"] == 8999
        assert doc["default_policy"] == {"timeout": "1s"}
    finally:
        w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["snap.json"]  # no temp file left behind


def test_only_changed_services_are_exported_again(tmp_path: Path) -> None:
    store = FakeStore()
    for i in range(50):
        store.set(f"s{i}", 9000 + i)
    w = SnapshotFileWriter(str(tmp_path / "s.json"), "/p", store.export, interval=0.05)
    try:
        w.mark("s0")
        assert _wait(lambda: w.writes == 1, 3)
        assert store.exported == [None]  # the first write takes every service
        store.set("s7", 1)
        w.mark("s7")
        assert _wait(lambda: w.writes == 2, 3)
        assert store.exported[1] == {"s7"}  # later writes re-serialise only what changed
        doc = json.loads((tmp_path / "s.json").read_text())
        assert len(doc["services"]) == 50
        assert doc["services"]["s7"]["instances"]["/p/services/s7/instances/i"]["port"] == 1
        del store.services["s3"]
        w.mark("s3")
        assert _wait(lambda: w.writes == 3, 3)
        assert "s3" not in json.loads((tmp_path / "s.json").read_text())["services"]
    finally:
        w.close()


def test_close_writes_what_is_pending(tmp_path: Path) -> None:
    store = FakeStore()
    path = tmp_path / "c.json"
    w = SnapshotFileWriter(str(path), "/p", store.export, interval=60)
    store.set("a", 1)
    w.mark("a")
    assert _wait(lambda: w.writes == 1, 3)  # the first write goes at once
    store.set("b", 2)
    w.mark("b")  # the next one would wait 60 s ...
    w.close()  # ... but close writes it
    assert set(json.loads(path.read_text())["services"]) == {"a", "b"}


def test_a_failed_write_is_counted_logged_and_retried(tmp_path: Path, caplog: Any) -> None:
    store = FakeStore()
    store.set("a", 1)
    target = tmp_path / "dir"
    errors = _writes("error")
    w = SnapshotFileWriter(str(target / "x.json"), "/p", store.export, interval=0.05)
    try:
        w.mark("a")
        assert _wait(lambda: _writes("error") > errors, 3)
        assert any("could not write snapshot file" in r.getMessage() and str(target) in
                   r.getMessage() for r in caplog.records)
        target.mkdir()  # the directory appears: the retry succeeds, with the same content
        assert _wait(lambda: w.writes == 1, 5)
        doc = read_snapshot_file(str(target / "x.json"), "/p")
        assert doc is not None and set(doc["services"]) == {"a"}
    finally:
        w.close()


@pytest.mark.parametrize(("content", "why"), [
    ("{not json", "unreadable"),
    ('{"format": "meshlib-snapshot/0", "prefix": "/p"}', "format"),
    ('{"format": "meshlib-snapshot/1", "prefix": "/other"}', "prefix"),
])
def test_reader_ignores_bad_files_and_says_why(tmp_path: Path, caplog: Any, content: str,
                                               why: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert read_snapshot_file(str(path), "/p") is None
    assert any(why in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert read_snapshot_file(str(tmp_path / "missing.json"), "/p") is None


def test_replace_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """A reader polling the file while it is rewritten 40 times never sees a torn document."""
    store = FakeStore()
    for i in range(300):
        store.set(f"s{i}", i)
    path = tmp_path / "a.json"
    w = SnapshotFileWriter(str(path), "/p", store.export, interval=0)
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(len(json.loads(path.read_text())["services"]))
            except FileNotFoundError:
                pass
            except ValueError:
                seen.append(-1)  # a torn document

    t = threading.Thread(target=reader)
    t.start()
    try:
        for n in range(40):
            w.mark(f"s{n}")
            assert _wait(lambda n=n: w.writes >= n + 1, 3)
    finally:
        stop.set()
        t.join()
        w.close()
    assert seen and set(seen) == {300}
    assert os.listdir(tmp_path) == ["a.json"]
