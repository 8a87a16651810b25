"""The snapshot store: etcd records in, one immutable ``ServiceSnapshot`` per service out.

The watch thread (``meshlib.discovery.watch.WatchManager``) feeds each watched service
prefix here as a full listing (``on_reset``) followed by ordered event batches
(``on_events``). For every batch the store rebuilds the service's snapshot and swaps it
into a dict with one assignment, so the call path reads ``store.get(service)`` without a
lock, the way Envoy swaps a cluster's host set.

Bad input never costs what is already known:
- a malformed instance record is skipped with a warning naming the key; the other
  instances stay;
- an invalid policy is refused (logged with key, field, value, reason, and counted in
  ``meshlib_policy_rejections_total``); the last good policy stays in force, like an
  xDS NACK in Envoy;
- etcd being unreachable changes nothing: snapshots are only replaced by what etcd
  actually returned (static stability, gRPC A57), never purged because of errors.

Optionally the store writes what it knows to a JSON file so that a process restarted
during an etcd outage can route with it (``Mesh(snapshot_path=...)``): it marks changed
services for :class:`~meshlib.discovery.snapshot_file.SnapshotFileWriter`, which writes off the
watch thread, coalesced and atomically (see that module for when, the format and sharing).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshlib.config import (
    DEFAULT_POLICY,
    Policy,
    PolicyError,
    RecordError,
    load_policy_document,
    merge_policy_dicts,
    parse_instance_record,
    parse_policy_dict,
)
from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.discovery.keys import KeyLayout
from meshlib.discovery.snapshot_file import SnapshotFileWriter, read_snapshot_file
from meshlib.telemetry import metrics

log = logging.getLogger("meshlib.discovery")

Listener = Callable[[str, ServiceSnapshot], None]


@dataclass
class _ServiceState:
    """Mutable per-service state, touched only by the watch thread (under the store lock)."""

    service: str
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    #: key -> the record's JSON text as etcd holds it (validated), for the on-disk snapshot:
    #: kept as text so that writing the file joins strings instead of re-encoding objects.
    records: dict[str, str] = field(default_factory=dict)
    policy_raw: dict[str, Any] | None = None  # last good service-specific policy document
    policy_revision: int = 0
    policy: Policy = DEFAULT_POLICY
    revision: int = 0
    from_cache: bool = False


def _text(value: bytes | str) -> str:
    """A validated record's JSON text (parse_instance_record accepted it as UTF-8 JSON)."""
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else value


def _load_policy_text(value: bytes, key: str) -> dict[str, Any]:
    """Parse a policy document (syntax only; the merged result is validated as a whole)."""
    return load_policy_document(value, key)


class SnapshotStore:
    """Builds and publishes immutable snapshots from etcd listings and events."""

    def __init__(
        self,
        layout: KeyLayout,
        *,
        snapshot_path: str | None = None,
        snapshot_interval: float = 1.0,
    ) -> None:
        self.layout = layout
        self.snapshot_path = snapshot_path
        self._writer: SnapshotFileWriter | None = None
        self._lock = threading.Lock()  # serialises writers only; readers never take it
        self._states: dict[str, _ServiceState] = {}
        self._snapshots: dict[str, ServiceSnapshot] = {}
        #: ``lookup(service)``: the published snapshot or None (the dict's own ``get``: no
        #: Python frame on the call path; the dict is only ever updated in place).
        self.lookup = self._snapshots.get
        self._default_raw: dict[str, Any] = {}
        self._default_revision = 0
        self._listeners: list[Listener] = []
        self._changed = threading.Condition(threading.Lock())
        self._endpoint_gauge = metrics.cached_children(metrics.ENDPOINTS)
        self._policy_rev_gauge = metrics.cached_children(metrics.POLICY_REVISION)
        self._updates = metrics.cached_children(metrics.DISCOVERY_UPDATES)
        if snapshot_path:
            self._load_disk_cache(snapshot_path)
            self._writer = SnapshotFileWriter(
                snapshot_path, layout.prefix, self._export, interval=snapshot_interval
            )

    def close(self) -> None:
        """Write what the snapshot file still lacks and stop its writer (no-op without one)."""
        if self._writer is not None:
            self._writer.close()

    # --- read side (call path) ----------------------------------------------------------
    def get(self, service: str) -> ServiceSnapshot | None:
        return self._snapshots.get(service)

    def services(self) -> list[str]:
        return sorted(self._snapshots)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners = [*self._listeners, listener]

        def remove() -> None:
            with self._lock:
                self._listeners = [x for x in self._listeners if x is not listener]

        return remove

    def wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    # --- write side (watch thread) -----------------------------------------------------
    def ensure_service(self, service: str) -> None:
        with self._lock:
            if service not in self._states:
                self._states[service] = _ServiceState(service)

    def reset_service(self, service: str, kvs: Iterable[Any], revision: int) -> None:
        """Replace everything known about ``service`` with a full listing at ``revision``."""
        with self._lock:
            st = self._states.setdefault(service, _ServiceState(service))
            seen_policy = False
            endpoints: dict[str, Endpoint] = {}
            records: dict[str, str] = {}
            for kv in kvs:
                kind = self.layout.parse(kv.key)
                if kind is None or kind[1] != service:
                    continue
                if kind[0] == "instance":
                    ep = self._parse_instance(service, kind[2] or "", kv.key, kv.value)
                    if ep is not None:
                        endpoints[kv.key] = ep
                        records[kv.key] = _text(kv.value)
                    elif kv.key in st.endpoints:  # malformed update of a known key: keep old
                        endpoints[kv.key] = st.endpoints[kv.key]
                        records[kv.key] = st.records[kv.key]
                elif kind[0] == "policy":
                    seen_policy = True
                    self._apply_service_policy(st, kv.key, kv.value, kv.mod_revision)
            if not seen_policy:
                self._clear_service_policy(st)
            st.endpoints, st.records = endpoints, records
            st.revision = revision
            st.from_cache = False
            self._publish(st)

    def apply_events(self, service: str, events: Iterable[tuple[str, Any]], revision: int) -> None:
        with self._lock:
            st = self._states.setdefault(service, _ServiceState(service))
            for etype, kv in events:
                kind = self.layout.parse(kv.key)
                if kind is None or kind[1] != service:
                    continue
                if kind[0] == "instance":
                    if etype == "delete":
                        st.endpoints.pop(kv.key, None)
                        st.records.pop(kv.key, None)
                    else:
                        ep = self._parse_instance(service, kind[2] or "", kv.key, kv.value)
                        if ep is not None:
                            st.endpoints[kv.key] = ep
                            st.records[kv.key] = _text(kv.value)
                elif kind[0] == "policy":
                    if etype == "delete":
                        self._clear_service_policy(st)
                    else:
                        self._apply_service_policy(st, kv.key, kv.value, kv.mod_revision)
            st.revision = revision
            st.from_cache = False
            self._publish(st)

    def reset_default_policy(self, value: bytes | None, mod_revision: int) -> None:
        """The default policy key's current value (None = absent)."""
        with self._lock:
            key = self.layout.default_policy_key
            if value is None:
                new_raw: dict[str, Any] = {}
            else:
                try:
                    new_raw = _load_policy_text(value, key)
                except PolicyError as exc:
                    self._reject("_default", exc)
                    return
            self._default_raw = new_raw
            self._default_revision = mod_revision if value is not None else 0
            if self._writer is not None:
                self._writer.mark(None)
            for st in self._states.values():
                self._rebuild_policy(st, key)
                self._publish(st)

    # --- internals ---------------------------------------------------------------------
    def _parse_instance(self, service: str, iid: str, key: str, value: bytes) -> Endpoint | None:
        try:
            return parse_instance_record(key, value, service=service, instance_id=iid)
        except RecordError as exc:
            log.warning("skipping malformed instance record: %s", exc)
            metrics.RECORD_REJECTIONS.labels(service).inc()
            return None

    def _reject(self, service: str, exc: PolicyError) -> None:
        log.error("policy refused, last good policy stays in force: %s", exc)
        metrics.POLICY_REJECTIONS.labels(service).inc()

    def _apply_service_policy(self, st: _ServiceState, key: str, value: bytes, rev: int) -> None:
        try:
            raw = _load_policy_text(value, key)
        except PolicyError as exc:
            self._reject(st.service, exc)
            return
        old_raw, old_rev = st.policy_raw, st.policy_revision
        st.policy_raw, st.policy_revision = raw, rev
        if not self._rebuild_policy(st, key):
            st.policy_raw, st.policy_revision = old_raw, old_rev

    def _clear_service_policy(self, st: _ServiceState) -> None:
        if st.policy_raw is None:
            return
        old_raw, old_rev = st.policy_raw, st.policy_revision
        st.policy_raw, st.policy_revision = None, 0
        if not self._rebuild_policy(st, self.layout.policy_key(st.service)):
            st.policy_raw, st.policy_revision = old_raw, old_rev

    def _rebuild_policy(self, st: _ServiceState, key: str) -> bool:
        """Effective policy = service document deep-merged over the default document."""
        merged = merge_policy_dicts(self._default_raw, st.policy_raw or {})
        try:
            st.policy = parse_policy_dict(merged, key) if merged else DEFAULT_POLICY
        except PolicyError as exc:
            self._reject(st.service, exc)
            return False
        return True

    def _publish(self, st: _ServiceState) -> None:
        endpoints = tuple(st.endpoints[k] for k in sorted(st.endpoints))
        snap = ServiceSnapshot(
            service=st.service,
            endpoints=endpoints,
            policy=st.policy,
            revision=st.revision,
            policy_revision=st.policy_revision,
            from_cache=st.from_cache,
        )
        old = self._snapshots.get(st.service)
        if (
            old is not None
            and old.endpoints == snap.endpoints
            and old.policy is snap.policy
            and old.from_cache == snap.from_cache
        ):
            # Nothing the call path sees changed; keep the old object (cheap for readers).
            return
        self._snapshots[st.service] = snap  # the atomic swap
        self._endpoint_gauge(st.service).set(len(endpoints))  # type: ignore[attr-defined]
        self._policy_rev_gauge(st.service).set(st.policy_revision)  # type: ignore[attr-defined]
        self._updates(st.service).inc()  # type: ignore[attr-defined]
        if self._writer is not None and not st.from_cache:
            self._writer.mark(st.service)
        for listener in self._listeners:
            try:
                listener(st.service, snap)
            except Exception:  # a listener must not break discovery
                log.exception("snapshot listener failed")
        with self._changed:
            self._changed.notify_all()

    # --- on-disk snapshot ----------------------------------------------------------------
    def _export(
        self, services: set[str] | None
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any] | None]]:
        """Copies of what the snapshot file holds for ``services`` (None: all), for the writer
        thread to serialise outside the lock. Shallow copies: records are replaced, not mutated."""
        with self._lock:
            names = list(self._states) if services is None else list(services)
            parts: dict[str, dict[str, Any] | None] = {}
            for name in names:
                st = self._states.get(name)
                parts[name] = None if st is None else {
                    "instances": dict(st.records),
                    "policy": st.policy_raw,
                    "policy_revision": st.policy_revision,
                }
            return dict(self._default_raw), parts

    def _load_disk_cache(self, path: str) -> None:
        doc = read_snapshot_file(path, self.layout.prefix)
        if doc is None:
            return
        with self._lock:
            self._default_raw = doc.get("default_policy") or {}
            for service, data in (doc.get("services") or {}).items():
                st = _ServiceState(service, from_cache=True)
                for key, rec in (data.get("instances") or {}).items():
                    kind = self.layout.parse(key)
                    if not kind or kind[0] != "instance":
                        continue
                    text = json.dumps(rec)
                    ep = self._parse_instance(service, kind[2] or "", key, text.encode())
                    if ep is not None:
                        st.endpoints[key], st.records[key] = ep, text
                st.policy_raw = data.get("policy")
                st.policy_revision = int(data.get("policy_revision") or 0)
                self._rebuild_policy(st, path)
                self._states[service] = st
                self._publish(st)
