"""How meshlib discovery scales with services, instances, churn and clients.

Against a throwaway etcd on loopback (``meshlib.testing.EtcdServer``) this bench:

1. writes ``--services`` x ``--instances`` instance records (default 1,000 x 10) in etcd Txns
   of 100 puts (etcd's default ``--max-txn-ops`` is 128);
2. starts one ``Mesh`` that watches every service and measures the time until every snapshot
   holds all its endpoints, the watches etcd then serves (``etcd_debugging_mvcc_watcher_total``
   and ``etcd_debugging_mvcc_watch_stream_total`` from etcd's Prometheus endpoint), the
   process's RSS growth, etcd's RSS (``VmRSS`` in ``/proc/<pid>/status``) and, in a fresh child
   process, the Python heap the snapshots keep (``tracemalloc`` delta, per endpoint);
3. churns ``--churn`` records, first with one writer process doing one put at a time, then with
   Txns of 100 puts (and once more with the Mesh behind ``etcd grpc-proxy``), and counts what the
   watcher applies: snapshot swaps (``Mesh.add_listener``), updates visible per second, per-update
   lag and the lag after the last write; then compares every snapshot with etcd's content;
4. fans out ``--clients`` watching clients (``--per-client`` services each, in ``--groups``
   groups that watch the same services, as replicas of one caller do) directly and through
   ``etcd grpc-proxy``, twice: with meshlib ``Mesh`` objects (in worker processes, like
   ``bench/propagation.py``) and with bare etcd Watch streams (same requests, no meshlib logic),
   so the proxy's watch coalescing is measured apart from meshlib's own watch logic.
   It reports the watch streams and watchers etcd serves, their idle CPU and the propagation
   delay of a change;
5. holds ``--cost-streams`` x ``--cost-watches`` idle bare watches (default 50 x 1,000) directly
   and through the proxy: etcd's Go heap and RSS per watcher, the proxy's RSS per client watch.

Each update carries a sequence number in the record's ``metadata.seq``; a listener stamps the
``time.monotonic()`` (system-wide on Linux) at which it first becomes visible.

Prints tables, a PROBLEMS section for anything that failed, and as the last line
``scale services=<n> instances=<m> ...`` with the key numbers. Takes ~1.5-2 min on 2 cores.

    python bench/scale.py [--services 1000] [--instances 10] [--churn 5000] [--clients 20]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Any

PREFIX = "/meshlib-bench/v1"
TXN_OPS = 100
WATCH_STREAMS = "etcd_debugging_mvcc_watch_stream_total"
WATCHERS = "etcd_debugging_mvcc_watcher_total"
WATCH_RPCS = 'grpc_server_started_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch"'
COALESCED = "etcd_grpc_proxy_watchers_coalescing_total"
HEAP = "go_memstats_heap_inuse_bytes"

problems: list[str] = []


# --------------------------------------------------------------------------- records, etcd


def svc(i: int) -> str:
    return f"svc-{i:04d}"


def inst_key(i: int, j: int) -> str:
    return f"{PREFIX}/services/{svc(i)}/instances/i-{j:02d}"


def record(i: int, j: int, seq: int = 0) -> bytes:
    """An instance record as ``Endpoint.to_record()`` writes it (docs/etcd-layout.md)."""
    from meshlib.core.endpoints import Endpoint

    ep = Endpoint(
        service=svc(i), instance_id=f"i-{j:02d}", address=f"10.{i // 250}.{i % 250}.{j + 1}",
        port=8080, zone=f"zone-{j % 3}", labels={"version": "v1"},
        metadata={"pod": f"{svc(i)}-{j:02d}", "seq": seq},
    )
    return json.dumps(ep.to_record(), separators=(",", ":")).encode()


def seq_target(seq: int, services: int, instances: int) -> tuple[int, int]:
    """Update number ``seq`` goes to service ``seq % services``: consecutive ones never collide."""
    return seq % services, (seq // services) % instances


def put_txn(client: Any, items: Iterable[tuple[str, bytes]]) -> int:
    """One etcd Txn putting every (key, value); returns the revision."""
    from etcd3.etcdrpc import rpc_pb2

    ops = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k.encode(), value=v))
           for k, v in items]
    resp = client.kv.Txn(rpc_pb2.TxnRequest(success=ops), timeout=10)
    return int(resp.header.revision)


def rss_kib(pid: int | None = None) -> int:
    """``VmRSS`` of a process in KiB (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (``/proc/<pid>/stat`` fields 14 and 15)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def code_fingerprint() -> str:
    """Short hash of meshlib's sources, to tie a run to the code it measured."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "meshlib")
    h = hashlib.sha1()
    for dirpath, _dirs, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:10]


def scrape(endpoint: str, path: str = "/metrics") -> dict[str, float]:
    """Prometheus text from ``http://<endpoint><path>``: ``{series: value}`` (labels kept)."""
    text = urllib.request.urlopen(f"http://{endpoint}{path}", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def watch_counts(endpoint: str, path: str = "/metrics") -> dict[str, float]:
    """Watch streams, watchers and Watch RPCs started (cumulative) that a member reports."""
    m = scrape(endpoint, path)
    rpcs = sum(v for k, v in m.items() if k.startswith(WATCH_RPCS))
    return {"streams": m.get(WATCH_STREAMS, 0.0), "watchers": m.get(WATCHERS, 0.0),
            "rpcs": rpcs, "coalesced": m.get(COALESCED, 0.0)}


def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a[k] - b.get(k, 0.0) for k in a}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class WarningCounter(logging.Handler):
    """Counts meshlib warnings (and the 'stream silent' ones) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.total = 0
        self.silent = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.total += 1
        msg = record.getMessage()
        if "silent" in msg:
            self.silent += 1
        if self.first is None:
            self.first = msg


def count_warnings() -> WarningCounter:
    handler = WarningCounter()
    logging.getLogger("meshlib").addHandler(handler)
    return handler


def row(label: str, value: object, note: str = "") -> None:
    print(f"  {label:44s} {value!s:>14s}  {note}")


# --------------------------------------------------------------------------- phase 1


def populate(client: Any, services: int, instances: int) -> float:
    items = [(inst_key(i, j), record(i, j)) for i in range(services) for j in range(instances)]
    t0 = time.monotonic()
    for k in range(0, len(items), TXN_OPS):
        put_txn(client, items[k:k + TXN_OPS])
    return time.monotonic() - t0


# --------------------------------------------------------------------------- phase 2 and 3


class Tracker:
    """``Mesh`` listener: counts swaps, services fully synced and when each seq became visible."""

    def __init__(self, services: int, instances: int) -> None:
        self.want_endpoints = instances
        self.services = services
        self.full: set[str] = set()
        self.all_full = threading.Event()
        self.swaps = 0
        self.seen: dict[int, float] = {}
        self.want_seqs: set[int] = set()
        self.all_seen = threading.Event()

    def expect(self, seqs: Iterable[int]) -> None:
        self.want_seqs = set(seqs)
        self.all_seen.clear()

    def __call__(self, service: str, snap: Any) -> None:
        now = time.monotonic()
        self.swaps += 1
        if len(snap.endpoints) >= self.want_endpoints and service not in self.full:
            self.full.add(service)
            if len(self.full) >= self.services:
                self.all_full.set()
        for ep in snap.endpoints:
            s = ep.metadata.get("seq")
            if s and s not in self.seen:
                self.seen[s] = now
                self.want_seqs.discard(s)
                if not self.want_seqs:
                    self.all_seen.set()


def _writer(endpoint: str, first: int, count: int, services: int, instances: int,
            mode: str, out: Any) -> None:
    """One writer process: ``seq`` = one put at a time; ``txn`` = Txns of 100 puts."""
    from meshlib.discovery.etcd_client import EtcdClient

    client = EtcdClient(endpoint)
    sent: list[float] = []
    seqs = list(range(first, first + count))
    if mode == "seq":
        for s in seqs:
            i, j = seq_target(s, services, instances)
            sent.append(time.monotonic())
            client.put(inst_key(i, j), record(i, j, s))
    else:
        for k in range(0, count, TXN_OPS):
            batch = seqs[k:k + TXN_OPS]
            items = [(inst_key(*seq_target(s, services, instances)),
                      record(*seq_target(s, services, instances), s)) for s in batch]
            t = time.monotonic()
            put_txn(client, items)
            sent.extend([t] * len(batch))
    out.put((sent, time.monotonic()))
    client.close()


def churn(endpoint: str, tracker: Tracker, first: int, count: int, services: int,
          instances: int, mode: str, label: str) -> dict[str, float]:
    seqs = range(first, first + count)
    tracker.expect(seqs)
    swaps0 = tracker.swaps
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_writer,
                       args=(endpoint, first, count, services, instances, mode, out))
    proc.start()
    sent, t_end = out.get(timeout=240)
    proc.join(10)
    tracker.all_seen.wait(30)
    seen = [tracker.seen[s] for s in seqs if s in tracker.seen]
    lags = [(tracker.seen[s] - sent[s - first]) * 1000 for s in seqs if s in tracker.seen]
    missing = count - len(seen)
    if missing:
        problems.append(f"churn/{mode} {label}: {missing} of {count} updates never became visible "
                        "within 30 s of the last write")
    t_first = sent[0]
    last_seen = max(seen) if seen else float("nan")
    return {
        "writes": count,
        "write_rate": count / max(1e-9, t_end - t_first),
        "applied": len(seen),
        "apply_rate": len(seen) / max(1e-9, last_seen - t_first),
        "swaps": tracker.swaps - swaps0,
        "lag_p50_ms": pct(lags, 0.5),
        "lag_p99_ms": pct(lags, 0.99),
        "lag_end_ms": (last_seen - t_end) * 1000,
        "missing": missing,
    }


def _memory_probe(endpoint: str, services: int, instances: int, out: Any) -> None:
    """Fresh process: tracemalloc delta of a Mesh going from 0 to ``services`` synced snapshots."""
    import tracemalloc

    from meshlib import Mesh

    tracemalloc.start()
    mesh = Mesh(endpoint, prefix=PREFIX, handle_sigterm=False)
    deadline = time.monotonic() + 10
    while not mesh.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()
    s0 = tracemalloc.take_snapshot()
    names = [svc(i) for i in range(services)]
    for n in names:
        mesh.watch(n)
    deadline = time.monotonic() + 120
    pending = list(names)
    while pending and time.monotonic() < deadline:
        pending = [n for n in pending if _endpoints(mesh, n) < instances]
        time.sleep(0.1)
    time.sleep(1.0)  # let the create answers and first progress notifications drain
    gc.collect()
    s1 = tracemalloc.take_snapshot()
    stats = s1.compare_to(s0, "filename")
    total = sum(st.size_diff for st in stats)
    top = []
    for st in stats[:6]:
        name = st.traceback[0].filename
        for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
            if marker in name:
                name = name.split(marker, 1)[1]
        top.append((name, st.size_diff))
    snaps = [mesh.store.get(n) for n in names]
    out.put({"total": total, "top": top, "pending": len(pending),
             "deep_snapshots": deep_size(snaps)})
    mesh.close()


def _endpoints(mesh: Any, service: str) -> int:
    snap = mesh.store.get(service)
    return 0 if snap is None else len(snap.endpoints)


def deep_size(root: Any) -> int:
    """Bytes of ``root`` and everything it references (each object once), policies excluded."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict | MappingProxyType):
            for k, v in obj.items():
                stack.extend((k, v))
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__slots__"):
            for name in getattr(type(obj), "__slots__", ()):
                if name != "policy" and hasattr(obj, name):
                    stack.append(getattr(obj, name))
    return total


def one_mesh(etcd: Any, client: Any, args: argparse.Namespace, target: str, label: str,
             modes: tuple[str, ...], first_seq: int,
             snapshot_path: str | None = None) -> dict[str, Any]:
    """One Mesh on ``target`` watching every service: sync, watches, memory, then churn
    (with ``snapshot_path``: also the on-disk snapshot's writes)."""
    from meshlib import Mesh

    n, m = args.services, args.instances
    res: dict[str, Any] = {}
    base = watch_counts(etcd.endpoint)
    gc.collect()
    rss0 = rss_kib()
    tracker = Tracker(n, m)
    mesh = Mesh(target, prefix=PREFIX, handle_sigterm=False, snapshot_path=snapshot_path)
    mesh.add_listener(tracker)
    t0 = time.monotonic()
    for i in range(n):
        mesh.watch(svc(i))
    if not tracker.all_full.wait(args.sync_timeout):
        problems.append(f"one mesh {label}: only {len(tracker.full)}/{n} services synced within "
                        f"{args.sync_timeout}s")
    res["sync_s"] = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        c = diff(watch_counts(etcd.endpoint), base)
        if c["watchers"] >= n + 1 or (label != "direct" and c["watchers"] > 0):
            break
        time.sleep(0.1)
    res["created_s"] = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while misrouted(mesh) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    res["misrouted"] = misrouted(mesh)
    if res["misrouted"]:
        problems.append(f"one mesh {label}: {res['misrouted']} of {n + 1} watches hold another "
                        "watch's etcd id ('created' answers came out of request order); their "
                        "events are dropped")
    res["watches"] = diff(watch_counts(etcd.endpoint), base)
    if label == "direct" and res["watches"]["watchers"] != n + 1:
        problems.append(f"one mesh: etcd serves {res['watches']['watchers']:.0f} watchers, "
                        f"expected {n + 1} ({n} services + defaults/policy)")
    gc.collect()
    res["rss_delta_kib"] = rss_kib() - rss0
    res["etcd_rss_synced_kib"] = rss_kib(etcd.pid)
    res["etcd_heap_synced"] = scrape(etcd.endpoint).get(HEAP, 0.0)
    res["swaps_sync"] = tracker.swaps
    streams0 = mesh._watcher.streams_opened
    seq = first_seq
    for mode in modes:
        res[f"churn_{mode}"] = churn(etcd.endpoint, tracker, seq, args.churn, n, m, mode, label)
        seq += args.churn
    res["reopened"] = mesh._watcher.streams_opened - streams0
    res["streams_opened"] = mesh._watcher.streams_opened
    res["stale"] = stale_services(client, mesh, n)
    if res["stale"]:
        problems.append(f"one mesh {label}: after churn {len(res['stale'])} service snapshots "
                        f"differ from etcd, e.g. {res['stale'][:3]}")
    if res["reopened"]:
        problems.append(f"one mesh {label}: the watch stream was reopened {res['reopened']} "
                        "time(s) during churn")
    res["etcd_rss_churned_kib"] = rss_kib(etcd.pid)
    res["db_size"] = client.status()["db_size"]
    writer = mesh.store._writer
    mesh.close()
    if writer is not None:
        res["file"] = {"writes": writer.writes, "seconds": writer.write_seconds,
                       "max_s": writer.max_write_seconds, "bytes": writer.last_bytes}
    return res


def misrouted(mesh: Any) -> int | None:
    """Watches whose etcd watch id is not their position in request order, or None if unknown.

    etcd and the grpc-proxy both number a stream's watches 0, 1, 2... in request order; meshlib
    pairs each 'created' answer with the oldest pending create. Reads meshlib internals, so it
    answers None when they change or when not every watch is created on one stream yet.
    """
    try:
        ws = sorted(mesh._watcher._watches.values(), key=lambda w: w.wid)
        if len({w.stream for w in ws}) != 1 or any(w.server_id is None for w in ws):
            return None
        return sum(1 for k, w in enumerate(ws) if w.server_id != k)
    except AttributeError:
        return None


def stale_services(client: Any, mesh: Any, services: int) -> list[str]:
    """Services whose snapshot (address, port, metadata) differs from what etcd holds now."""
    kvs, _rev = client.get_prefix(f"{PREFIX}/services/")
    want: dict[str, set[tuple[str, str]]] = {}
    for kv in kvs:
        name = kv.key[len(PREFIX) + len("/services/"):].split("/", 1)[0]
        want.setdefault(name, set()).add((kv.key, json.dumps(json.loads(kv.value)["metadata"],
                                                               sort_keys=True)))
    stale = []
    for i in range(services):
        snap = mesh.store.get(svc(i))
        have = {(ep.key, json.dumps(dict(ep.metadata), sort_keys=True))
                for ep in (snap.endpoints if snap else ())}
        if have != want.get(svc(i), set()):
            stale.append(svc(i))
    return stale


def memory_probe(etcd: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_memory_probe,
                       args=(etcd.endpoint, args.services, args.instances, out))
    proc.start()
    try:
        res: dict[str, Any] = out.get(timeout=180)
    except queue.Empty:
        problems.append("memory probe: no answer from the child process within 180 s")
        res = None  # type: ignore[assignment]
    proc.join(20)
    if res and res["pending"]:
        problems.append(f"memory probe: {res['pending']} services not synced; bytes undercounted")
    return res


# --------------------------------------------------------------------------- phase 4


def client_services(args: argparse.Namespace) -> list[list[str]]:
    """Client c watches ``per_client`` services of group ``c % groups`` (groups are disjoint)."""
    return [[svc((c % args.groups) * args.per_client + k) for k in range(args.per_client)]
            for c in range(args.clients)]


def _fanout_worker(target: str, lists: list[list[str]], first_id: int, instances: int,
                   sync_timeout: float, out: Any, ctl: Any, stop: Any) -> None:
    from meshlib import Mesh, MeshTimeout

    warnings = count_warnings()
    meshes = []
    t0 = time.monotonic()
    for idx, names in enumerate(lists):
        mesh = Mesh(target, prefix=PREFIX, handle_sigterm=False)
        seen: set[int] = set()

        def on_swap(service: str, snap: Any, seen: set[int] = seen, cid: int = first_id + idx
                    ) -> None:
            now = time.monotonic()
            for ep in snap.endpoints:
                s = ep.metadata.get("seq")
                if s and s not in seen:
                    seen.add(s)
                    out.put((s, cid, now))

        mesh.add_listener(on_swap)
        for n in names:
            mesh.watch(n)
        meshes.append((mesh, names))
    deadline = t0 + sync_timeout
    synced = 0
    for mesh, names in meshes:
        try:
            for n in names:
                mesh.wait_for(n, min_endpoints=instances,
                              timeout=max(0.01, deadline - time.monotonic()))
            synced += 1
        except MeshTimeout:
            pass
    ctl.put(("ready", len(meshes), synced, time.monotonic() - t0))
    stop.wait()
    streams = sum(mesh._watcher.streams_opened for mesh, _ in meshes)
    connected = sum(1 for mesh, _ in meshes if mesh.connected)
    for mesh, _ in meshes:
        mesh.close()
    ctl.put(("stats", streams, connected, warnings.silent, warnings.total, warnings.first))


class RawWatcher:
    """A bare etcd Watch stream with the creates meshlib would send (no progress requests)."""

    def __init__(self, target: str, prefixes: list[str], start_rev: int, cid: int,
                 sink: list[tuple[int, int, float]], progress_notify: bool = True) -> None:
        import grpc
        from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

        from meshlib.discovery.etcd_client import prefix_range_end

        self.cid = cid
        self.created = 0
        self.out_of_order = 0  # 'created' answers whose id is below an earlier one's
        self.canceled = 0
        self.want = len(prefixes)
        self.ready = threading.Event()
        self.sink = sink
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)])
        self._q: queue.Queue[Any] = queue.Queue()
        for p in prefixes:
            key = p.encode()
            self._q.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=key, range_end=prefix_range_end(key), start_revision=start_rev,
                progress_notify=progress_notify)))
        self.call = rpc_pb2_grpc.WatchStub(self.channel).Watch(iter(self._q.get, None))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        last_id = -1
        try:
            for resp in self.call:
                now = time.monotonic()
                if resp.created:
                    if self.created and resp.watch_id < last_id:
                        self.out_of_order += 1
                    last_id = resp.watch_id
                    self.created += 1
                    if self.created >= self.want:
                        self.ready.set()
                if resp.canceled:
                    self.canceled += 1
                for ev in resp.events:
                    s = json.loads(ev.kv.value).get("metadata", {}).get("seq")
                    if s:
                        self.sink.append((s, self.cid, now))
        except Exception:
            pass

    def close(self) -> None:
        self._q.put(None)
        self.call.cancel()
        self.thread.join(2)
        self.channel.close()


def hold(seconds: float, etcd_pid: int | None, proxy_pid: int | None) -> dict[str, float]:
    """Sleep while the clients sit idle; CPU share of etcd (and the proxy) meanwhile."""
    e0, p0, t0 = cpu_seconds(etcd_pid), cpu_seconds(proxy_pid) if proxy_pid else 0.0, \
        time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {"etcd_cpu": (cpu_seconds(etcd_pid) - e0) / dt,
            "proxy_cpu": (cpu_seconds(proxy_pid) - p0) / dt if proxy_pid else 0.0}


def propagate(client: Any, args: argparse.Namespace, first_seq: int,
              receive: Callable[[float], list[tuple[int, int, float]]]) -> dict[str, float]:
    """Write ``rounds`` Txns (one update per group) and collect when each client sees it."""
    sent: dict[int, float] = {}
    groups = min(args.groups, args.clients)
    for r in range(args.rounds):
        items, seqs = [], []
        for g in range(groups):
            i = g * args.per_client + (r % args.per_client)
            s = first_seq + r * groups + g
            items.append((inst_key(i, r % args.instances), record(i, r % args.instances, s)))
            seqs.append(s)
        t0 = time.monotonic()
        put_txn(client, items)
        for s in seqs:
            sent[s] = t0
        time.sleep(0.1)
    expected = args.rounds * args.clients
    lat: list[float] = []
    deadline = time.monotonic() + 5
    while len(lat) < expected and time.monotonic() < deadline:
        for s, _cid, t in receive(max(0.0, deadline - time.monotonic())):
            if s in sent:
                lat.append((t - sent[s]) * 1000)
    return {"expected": expected, "got": len(lat), "p50_ms": pct(lat, 0.5),
            "p90_ms": pct(lat, 0.9), "p99_ms": pct(lat, 0.99), "max_ms": max(lat) if lat else float("nan")}


def fanout_meshlib(etcd: Any, client: Any, target: str, label: str, args: argparse.Namespace,
                   first_seq: int, sync_timeout: float, proxy_pid: int | None
                   ) -> dict[str, Any]:
    lists = client_services(args)
    workers = max(1, min(args.workers, args.clients))
    chunks = [lists[w::workers] for w in range(workers)]
    firsts = [sum(len(c) for c in chunks[:w]) for w in range(workers)]
    ctx = mp.get_context("spawn")
    out, ctl, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    base = watch_counts(etcd.endpoint)
    procs = [ctx.Process(target=_fanout_worker, args=(target, chunk, first, args.instances,
                                                      sync_timeout, out, ctl, stop))
             for chunk, first in zip(chunks, firsts, strict=True) if chunk]
    for p in procs:
        p.start()
    readies = [ctl.get(timeout=sync_timeout + 120) for _ in procs]
    synced = sum(r[2] for r in readies)
    res: dict[str, Any] = {"clients": sum(r[1] for r in readies), "synced": synced,
                           "sync_s": max(r[3] for r in readies)}
    res["idle"] = hold(args.hold, etcd.pid, proxy_pid)
    res["counts"] = diff(watch_counts(etcd.endpoint), base)
    res["etcd_rss_kib"] = rss_kib(etcd.pid)
    while not out.empty():
        out.get()

    def receive(timeout: float) -> list[tuple[int, int, float]]:
        try:
            return [out.get(timeout=min(timeout, 0.5))]
        except queue.Empty:
            return []

    res["prop"] = propagate(client, args, first_seq, receive)
    stop.set()
    stats = [ctl.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(20)
    res["streams_opened"] = sum(s[1] for s in stats)
    res["connected"] = sum(s[2] for s in stats)
    res["silent_warnings"] = sum(s[3] for s in stats)
    res["warnings"] = sum(s[4] for s in stats)
    res["first_warning"] = next((s[5] for s in stats if s[5]), None)
    if synced < res["clients"]:
        problems.append(
            f"meshlib {label}: {synced}/{res['clients']} clients synced within {sync_timeout:g}s; "
            f"{res['streams_opened']} watch streams opened by {res['clients']} clients, "
            f"{res['silent_warnings']} 'stream silent' warnings; first warning: "
            f"{res['first_warning']!r}")
    if res["prop"]["got"] < res["prop"]["expected"]:
        problems.append(f"meshlib {label}: {res['prop']['got']}/{res['prop']['expected']} "
                        "propagation deliveries arrived")
    return res


def fanout_raw(etcd: Any, client: Any, target: str, label: str, args: argparse.Namespace,
               first_seq: int, proxy_pid: int | None) -> dict[str, Any]:
    from meshlib.discovery.keys import KeyLayout

    layout = KeyLayout(PREFIX)
    base = watch_counts(etcd.endpoint)
    start_rev = int(client.status()["revision"]) + 1
    sink: list[tuple[int, int, float]] = []
    t0 = time.monotonic()
    watchers = [
        RawWatcher(target, [layout.default_policy_key]
                   + [layout.service_prefix(n) for n in names], start_rev, cid, sink)
        for cid, names in enumerate(client_services(args))
    ]
    ok = all(w.ready.wait(max(0.01, t0 + 30 - time.monotonic())) for w in watchers)
    res: dict[str, Any] = {"created_s": time.monotonic() - t0,
                           "created": sum(w.created for w in watchers),
                           "want": sum(w.want for w in watchers)}
    if not ok:
        problems.append(f"raw {label}: {res['created']}/{res['want']} watches created in 30 s")
    res["idle"] = hold(args.hold, etcd.pid, proxy_pid)
    res["counts"] = diff(watch_counts(etcd.endpoint), base)
    res["etcd_rss_kib"] = rss_kib(etcd.pid)
    taken = 0

    def receive(timeout: float) -> list[tuple[int, int, float]]:
        nonlocal taken
        if len(sink) == taken:
            time.sleep(min(timeout, 0.05))
        got = sink[taken:]
        taken += len(got)
        return got

    res["prop"] = propagate(client, args, first_seq, receive)
    res["canceled"] = sum(w.canceled for w in watchers)
    res["out_of_order"] = sum(w.out_of_order for w in watchers)
    if res["out_of_order"]:
        print(f"note: raw {label}: {res['out_of_order']} 'created' answers came out of request "
              "order (the proxy does this; meshlib keeps one create outstanding per stream, as "
              "etcd's Go client does, so it is not affected)")
    if res["canceled"]:
        problems.append(f"raw {label}: {res['canceled']} watches canceled by the server")
    if res["prop"]["got"] < res["prop"]["expected"]:
        problems.append(f"raw {label}: {res['prop']['got']}/{res['prop']['expected']} "
                        "propagation deliveries arrived")
    for w in watchers:
        w.close()
    return res


def watcher_cost(etcd: Any, client: Any, target: str, label: str, args: argparse.Namespace,
                 proxy: Any | None) -> dict[str, Any]:
    """Many idle watchers (no progress notifications): etcd heap and RSS per watcher."""
    from meshlib.discovery.keys import KeyLayout

    layout = KeyLayout(PREFIX)
    per = args.cost_watches
    groups = max(1, args.services // per)
    base = watch_counts(etcd.endpoint)
    heap0, rss0 = scrape(etcd.endpoint).get(HEAP, 0.0), rss_kib(etcd.pid)
    prss0 = rss_kib(proxy.pid) if proxy else 0
    start_rev = int(client.status()["revision"]) + 1
    sink: list[tuple[int, int, float]] = []
    t0 = time.monotonic()
    watchers = [
        RawWatcher(target, [layout.service_prefix(svc((c % groups) * per + k))
                            for k in range(per)], start_rev, c, sink, progress_notify=False)
        for c in range(args.cost_streams)
    ]
    ok = all(w.ready.wait(max(0.01, t0 + 60 - time.monotonic())) for w in watchers)
    created = sum(w.created for w in watchers)
    want = sum(w.want for w in watchers)
    if not ok:
        problems.append(f"watcher cost {label}: {created}/{want} watches created in 60 s")
    res: dict[str, Any] = {"created_s": time.monotonic() - t0, "client_watches": created,
                           "distinct": groups * per}
    time.sleep(1.0)
    res["counts"] = diff(watch_counts(etcd.endpoint), base)
    res["heap_delta"] = scrape(etcd.endpoint).get(HEAP, 0.0) - heap0
    res["rss_delta_kib"] = rss_kib(etcd.pid) - rss0
    res["proxy_rss_delta_kib"] = rss_kib(proxy.pid) - prss0 if proxy else 0
    for w in watchers:
        w.close()
    return res


# --------------------------------------------------------------------------- report


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-metric median of several one_mesh results (the fields phase 2b reports)."""
    if len(runs) == 1:
        return runs[0]

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    out = dict(runs[-1])
    out["sync_s"] = med([r["sync_s"] for r in runs])
    for mode in ("churn_seq", "churn_txn"):
        out[mode] = {k: med([r[mode][k] for r in runs]) for k in runs[0][mode]}
    return out


def report_snapshot(one: dict[str, Any], snap: dict[str, Any], rounds: int = 1) -> None:
    """Phase 2b: the same Mesh without and with ``snapshot_path``, side by side."""
    print(f"== 2b. Mesh(snapshot_path=...): without | with, median of {rounds} run(s) each "
          "(target: within 1.5x)")
    pairs = [
        ("initial sync (all snapshots full)", one["sync_s"], snap["sync_s"], "s", False),
        ("change latency p50 (one put at a time)", one["churn_seq"]["lag_p50_ms"],
         snap["churn_seq"]["lag_p50_ms"], "ms", False),
        ("change latency p99", one["churn_seq"]["lag_p99_ms"], snap["churn_seq"]["lag_p99_ms"],
         "ms", False),
        ("updates/s, one put at a time", one["churn_seq"]["apply_rate"],
         snap["churn_seq"]["apply_rate"], "/s", True),
        ("updates/s, Txns of 100 puts", one["churn_txn"]["apply_rate"],
         snap["churn_txn"]["apply_rate"], "/s", True),
    ]
    for label, a, b, unit, higher_better in pairs:
        ratio = (a / b if higher_better else b / a) if a and b else float("nan")
        row(label, f"{a:.2f} | {b:.2f} {unit}", f"cost x{ratio:.2f}")
    f = snap.get("file") or {}
    writes = f.get("writes", 0)
    row("snapshot file writes (whole run)", f"{writes}",
        f"{f.get('bytes', 0) / 2**20:.1f} MiB each; mean "
        f"{f.get('seconds', 0) / max(1, writes) * 1000:.0f} ms, max "
        f"{f.get('max_s', 0) * 1000:.0f} ms, off the watch thread")


def snapshot_line(n: int, m: int, one: dict[str, Any], snap: dict[str, Any]) -> str:
    return (
        f"scale_snapshot services={n} instances={n * m} "
        f"sync_s={one['sync_s']:.2f} sync_s_snapshot={snap['sync_s']:.2f} "
        f"lag_p50_ms={one['churn_seq']['lag_p50_ms']:.1f} "
        f"lag_p50_ms_snapshot={snap['churn_seq']['lag_p50_ms']:.1f} "
        f"updates_per_s={one['churn_seq']['apply_rate']:.0f} "
        f"updates_per_s_snapshot={snap['churn_seq']['apply_rate']:.0f} "
        f"burst_updates_per_s={one['churn_txn']['apply_rate']:.0f} "
        f"burst_updates_per_s_snapshot={snap['churn_txn']['apply_rate']:.0f} "
        f"file_writes={(snap.get('file') or {}).get('writes', 0)} problems={len(problems)}"
    )


def report_counts(label: str, c: dict[str, float], expected: str) -> None:
    row(f"{label}: etcd watch streams / watchers",
        f"{c['streams']:.0f} / {c['watchers']:.0f}", expected)
    row(f"{label}: Watch RPCs started at etcd", f"{c['rpcs']:.0f}",
        "cumulative; > streams means reconnects")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--churn", type=int, default=5000, help="updates per churn phase")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--per-client", type=int, default=50)
    ap.add_argument("--groups", type=int, default=4,
                    help="clients in one group watch the same services")
    ap.add_argument("--workers", type=int, default=4, help="processes for the meshlib clients")
    ap.add_argument("--rounds", type=int, default=30, help="propagation rounds per fan-out")
    ap.add_argument("--hold", type=float, default=4.0,
                    help="seconds to hold the fan-out idle (> 3 progress intervals)")
    ap.add_argument("--cost-streams", type=int, default=50, help="streams in the watcher-cost probe")
    ap.add_argument("--cost-watches", type=int, default=1000, help="watches per stream there")
    ap.add_argument("--sync-timeout", type=float, default=60.0)
    ap.add_argument("--proxy-sync-timeout", type=float, default=20.0)
    ap.add_argument("--snapshot-only", action="store_true",
                    help="only phases 1 and 2: one Mesh without and with snapshot_path")
    ap.add_argument("--snapshot-rounds", type=int, default=0,
                    help="runs of each (without / with snapshot_path), alternating")
    args = ap.parse_args()
    if args.groups * args.per_client > args.services or args.cost_watches > args.services:
        ap.error("--groups x --per-client and --cost-watches must not exceed --services")

    from meshlib.discovery.etcd_client import EtcdClient
    from meshlib.testing import EtcdGrpcProxy, EtcdServer

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    warnings = count_warnings()
    n, m = args.services, args.instances
    t_start = time.monotonic()
    print(f"meshlib code {code_fingerprint()}, {os.cpu_count()} CPUs, etcd and clients on loopback")
    with EtcdServer() as etcd:
        etcd.start()
        print(f"etcd {etcd.endpoint} (pid {etcd.pid})")
        client = EtcdClient(etcd.endpoint)
        etcd_rss_empty = rss_kib(etcd.pid)
        populate_s = populate(client, n, m)
        etcd_rss_loaded = rss_kib(etcd.pid)
        print(f"== 1. {n} services x {m} instances = {n * m} records "
              f"({len(record(0, 0))} bytes each)")
        row("write time (Txns of 100 puts)", f"{populate_s:.2f} s")
        row("etcd RSS empty -> loaded", f"{etcd_rss_empty / 1024:.0f} -> "
            f"{etcd_rss_loaded / 1024:.0f} MiB")

        one = one_mesh(etcd, client, args, etcd.endpoint, "direct", ("seq", "txn"), 1)
        # Side by side: without / with snapshot_path, alternating, --snapshot-rounds runs of
        # each (2 by default with --snapshot-only, else 1), reporting the median of each.
        rounds = args.snapshot_rounds or (2 if args.snapshot_only else 1)
        plain, snaps = [one], []
        seq0 = 1 + 3 * args.churn
        for r in range(rounds):
            order = ("snap", "plain") if r % 2 == 0 else ("plain", "snap")
            for kind in order:
                if kind == "plain" and len(plain) > r:
                    continue
                with tempfile.TemporaryDirectory(prefix="meshlib-bench-") as tmp:
                    res = one_mesh(etcd, client, args, etcd.endpoint, f"direct ({kind})",
                                   ("seq", "txn"), seq0,
                                   os.path.join(tmp, "snap.json") if kind == "snap" else None)
                seq0 += 2 * args.churn
                (snaps if kind == "snap" else plain).append(res)
        snap = median_run(snaps)
        report_snapshot(median_run(plain), snap, rounds)
        if args.snapshot_only:
            client.close()
            print(f"== PROBLEMS ({len(problems)})")
            for p in problems:
                print(f"  - {p}")
            print(snapshot_line(n, m, median_run(plain), snap))
            return
        print(f"== 2. one Mesh watching all {n} services (one Watch stream)")
        row("initial sync (all snapshots full)", f"{one['sync_s']:.2f} s",
            f"{n / one['sync_s']:.0f} services/s")
        row("all watches created on etcd", f"{one['created_s']:.2f} s")
        report_counts("one mesh", one["watches"], f"expected 1 / {n + 1}")
        row("process RSS growth", f"{one['rss_delta_kib'] / 1024:.1f} MiB",
            f"{one['rss_delta_kib'] * 1024 / (n * m):.0f} B/endpoint (includes grpc, allocator)")
        row("etcd RSS / Go heap in use, 1 mesh synced", f"{one['etcd_rss_synced_kib'] / 1024:.0f}"
            f" / {one['etcd_heap_synced'] / 2**20:.0f} MiB")
        mem = memory_probe(etcd, args)
        if mem:
            row("Python heap kept (tracemalloc, fresh proc)", f"{mem['total'] / 2**20:.1f} MiB",
                f"{mem['total'] / (n * m):.0f} B/endpoint, {mem['total'] / n:.0f} B/service")
            row("  of which snapshots (deep size)", f"{mem['deep_snapshots'] / 2**20:.1f} MiB",
                f"{mem['deep_snapshots'] / (n * m):.0f} B/endpoint")
            for name, size in mem["top"]:
                row(f"    {name[-42:]}", f"{size / 1024:.0f} KiB")

        print(f"== 3. churn: {args.churn} updates spread over the services, one writer process")
        with EtcdGrpcProxy(etcd.endpoints) as proxy:
            print(f"  (grpc-proxy {proxy.endpoint} for the churn via proxy)")
            via = one_mesh(etcd, client, args, proxy.endpoint, "via proxy", ("txn",),
                           1 + 2 * args.churn)
        churns = [("direct, one put at a time", one["churn_seq"]),
                  ("direct, Txns of 100 puts", one["churn_txn"]),
                  ("via proxy, Txns of 100 puts", via["churn_txn"])]
        for label, c in churns:
            row(f"{label}: writer", f"{c['write_rate']:.0f} puts/s")
            row(f"{label}: applied", f"{c['apply_rate']:.0f} upd/s",
                f"{c['applied']}/{c['writes']} visible, {c['swaps']} snapshot swaps")
            row(f"{label}: lag p50 / p99", f"{c['lag_p50_ms']:.1f} / {c['lag_p99_ms']:.1f} ms")
            row(f"{label}: lag after last write", f"{c['lag_end_ms']:.1f} ms",
                "<= 0: visible before the writer had its ack")
        row("via proxy: sync of 1 mesh x all services", f"{via['sync_s']:.2f} s",
            f"stream reopened {via['reopened']} time(s) during churn")
        for label, r in (("direct", one), ("via proxy", via)):
            row(f"{label}: snapshots differing from etcd after", f"{len(r['stale'])}/{n}",
                f"{r['streams_opened']} watch stream(s) opened in total")
            row(f"{label}: watches paired with a wrong etcd id", f"{r['misrouted']}",
                "None: could not be checked")
        row("etcd RSS after churn / db size", f"{one['etcd_rss_churned_kib'] / 1024:.0f} MiB / "
            f"{one['db_size'] / 2**20:.1f} MiB")

        print(f"== 4. fan-out: {args.clients} clients x {args.per_client} services "
              f"({args.groups} groups of identical watch sets), direct vs etcd grpc-proxy")
        distinct = min(args.groups, args.clients) * args.per_client + 1
        seq = 10 * args.churn + 1000
        step = 10 * args.rounds * args.groups
        results: dict[str, dict[str, Any]] = {}
        results["meshlib direct"] = fanout_meshlib(etcd, client, etcd.endpoint, "direct", args,
                                                   seq, args.sync_timeout, None)
        results["raw direct"] = fanout_raw(etcd, client, etcd.endpoint, "direct", args,
                                           seq + step, None)
        with EtcdGrpcProxy(etcd.endpoints) as proxy:
            print(f"  (grpc-proxy {proxy.endpoint} for the fan-out)")
            time.sleep(0.5)
            proxy_rss0 = rss_kib(proxy.pid)
            results["meshlib proxy"] = fanout_meshlib(etcd, client, proxy.endpoint, "proxy",
                                                      args, seq + 2 * step,
                                                      args.proxy_sync_timeout, proxy.pid)
            results["raw proxy"] = fanout_raw(etcd, client, proxy.endpoint, "proxy", args,
                                              seq + 3 * step, proxy.pid)
            pm = watch_counts(proxy.endpoint, "/proxy/metrics")
            proxy_rss = rss_kib(proxy.pid)
        per_client = args.per_client + 1
        for label, r in results.items():
            expect = (f"expected {args.clients} / {args.clients * per_client}"
                      if "direct" in label else f"best case 1 / {distinct}")
            report_counts(label, r["counts"], expect)
            if label.startswith("meshlib"):
                row(f"{label}: clients synced", f"{r['synced']}/{r['clients']}",
                    f"in {r['sync_s']:.1f} s; {r['streams_opened']} streams opened, "
                    f"{r['connected']} connected at the end")
            else:
                row(f"{label}: watches created", f"{r['created']}/{r['want']}",
                    f"in {r['created_s']:.2f} s; {r['out_of_order']} answered out of order")
            p = r["prop"]
            row(f"{label}: propagation p50 / p90 / p99",
                f"{p['p50_ms']:.1f}/{p['p90_ms']:.1f}/{p['p99_ms']:.1f} ms",
                f"max {p['max_ms']:.1f} ms, {p['got']}/{p['expected']} deliveries")
            idle = r["idle"]
            row(f"{label}: idle CPU etcd / proxy",
                f"{idle['etcd_cpu'] * 100:.1f}% / {idle['proxy_cpu'] * 100:.1f}%",
                f"of one core, over {args.hold:g} s")
        row("grpc-proxy: client Watch RPCs started", f"{pm['rpcs']:.0f}",
            f"its coalescing gauge read {pm['coalesced']:.0f}")
        row("grpc-proxy RSS idle -> after fan-out", f"{proxy_rss0 / 1024:.0f} -> "
            f"{proxy_rss / 1024:.0f} MiB")

        print(f"== 5. watcher cost: {args.cost_streams} idle streams x {args.cost_watches} "
              "watches (no progress notify)")
        cost = {"direct": watcher_cost(etcd, client, etcd.endpoint, "direct", args, None)}
        with EtcdGrpcProxy(etcd.endpoints) as proxy:
            time.sleep(0.5)
            cost["proxy"] = watcher_cost(etcd, client, proxy.endpoint, "proxy", args, proxy)
        for label, c in cost.items():
            w = max(1.0, c["counts"]["watchers"])
            report_counts(f"{label}", c["counts"],
                          f"{c['client_watches']} client watches on {c['distinct']} prefixes")
            if label == "direct":
                row(f"{label}: etcd Go heap / RSS growth", f"{c['heap_delta'] / 2**20:.1f} / "
                    f"{c['rss_delta_kib'] / 1024:.1f} MiB",
                    f"{c['heap_delta'] / w:.0f} / {c['rss_delta_kib'] * 1024 / w:.0f} B per "
                    "etcd watcher (Go GC makes this noisy)")
            else:
                row("proxy: RSS growth", f"{c['proxy_rss_delta_kib'] / 1024:.1f} MiB",
                    f"{c['proxy_rss_delta_kib'] * 1024 / c['client_watches']:.0f} B per client "
                    "watch")
        client.close()

    if warnings.total:
        problems.append(f"bench process: {warnings.total} meshlib warnings, first: "
                        f"{warnings.first!r}")
    print(f"== PROBLEMS ({len(problems)})")
    for p in problems:
        print(f"  - {p}")
    md, rd = results["meshlib direct"], results["raw direct"]
    mp_, rp = results["meshlib proxy"], results["raw proxy"]
    bpe = f"{mem['total'] / (n * m):.0f}" if mem else "nan"
    if mp_["synced"] < mp_["clients"]:
        via_state = "FAILED"
    elif (via["stale"] or via["misrouted"] or via["churn_txn"]["missing"]
          or mp_["prop"]["got"] < mp_["prop"]["expected"]):
        via_state = "LOSSY"
    else:
        via_state = "ok"
    cd = cost["direct"]
    print(f"elapsed {time.monotonic() - t_start:.0f} s")
    print(
        f"scale services={n} instances={n * m} sync_s={one['sync_s']:.2f} "
        f"watches={one['watches']['watchers']:.0f} py_bytes_per_endpoint={bpe} "
        f"etcd_rss_mib={one['etcd_rss_synced_kib'] / 1024:.0f} "
        f"etcd_heap_bytes_per_watcher={cd['heap_delta'] / max(1, cd['counts']['watchers']):.0f} "
        f"churn_updates_per_s={one['churn_seq']['apply_rate']:.0f} "
        f"burst_updates_per_s={one['churn_txn']['apply_rate']:.0f} "
        f"lag_end_ms={one['churn_seq']['lag_end_ms']:.1f} "
        f"direct_streams={md['counts']['streams']:.0f} "
        f"direct_watchers={md['counts']['watchers']:.0f} "
        f"proxy_streams={mp_['counts']['streams']:.0f} "
        f"proxy_watchers={mp_['counts']['watchers']:.0f} "
        f"raw_proxy_watchers={rp['counts']['watchers']:.0f} "
        f"direct_p99_ms={md['prop']['p99_ms']:.1f} proxy_p99_ms={mp_['prop']['p99_ms']:.1f} "
        f"raw_direct_p99_ms={rd['prop']['p99_ms']:.1f} raw_proxy_p99_ms={rp['prop']['p99_ms']:.1f} "
        f"meshlib_via_proxy={via_state} "
        f"sync_s_snapshot={snap['sync_s']:.2f} "
        f"updates_per_s_snapshot={snap['churn_seq']['apply_rate']:.0f} "
        f"burst_updates_per_s_snapshot={snap['churn_txn']['apply_rate']:.0f} "
        f"problems={len(problems)}"
    )


if __name__ == "__main__":
    main()
