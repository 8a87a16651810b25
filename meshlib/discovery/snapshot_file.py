"""The on-disk snapshot (``Mesh(snapshot_path=...)``): written off the watch thread, coalesced,
atomically; read once at start.

Why: a process restarted while etcd is unreachable can route with what it knew (static
stability, gRPC A57). An earlier store rewrote the whole file on the watch thread at every
snapshot swap: at 1,000 services x 10 instances the initial load took ~50 s instead of ~1 s
(issue 10). Now:

* **When.** The store only *marks* a service dirty when its published snapshot changes (a set
  insert under the store's lock). A writer thread writes at most once every ``interval`` seconds
  (default 1 s) after a change, and once more at ``close()`` if anything is still unwritten. A
  burst of 10,000 changes therefore costs one or two writes, never 10,000.
* **Cost per write is bounded.** Each service's part of the document is built once and kept as a
  JSON fragment; a write rebuilds only the services marked since the last write (copied under the
  store's lock, built outside it), then joins the fragments: linear in the size of the file, with
  no work for services that did not change. Instance records are embedded as the JSON text etcd
  holds (the store keeps it for this), so building a fragment joins strings rather than encoding
  objects.
* **Atomic.** The document goes to a temporary file in the same directory
  (``.<name>.<random>.tmp``), is flushed and ``fsync``-ed, then renamed over ``path``
  (``os.replace``, atomic on POSIX) and the directory is ``fsync``-ed. A crash at any moment
  leaves the old file or the new one, never a torn one. A failed write (disk full, permissions) is
  logged with the path and the OS error, counted in ``meshlib_snapshot_file_writes_total{result=
  "error"}`` and retried at the next interval; discovery goes on.
* **Format** (version in the ``format`` field; a reader ignores a file of another format or key
  prefix)::

      {"format": "meshlib-snapshot/1", "prefix": "/meshlib/v1", "written_at": 1764880000.0,
       "default_policy": {...},
       "services": {"orders": {"instances": {"<etcd key>": {<instance record>}, ...},
                               "policy": {...} | null, "policy_revision": 42}}}

  Instance records are the JSON records of docs/etcd-layout.md; policies are the stored policy
  documents (the default and the service's own), merged again on load.
* **Sharing.** Each process writes the services *it* watches. Two processes may name the same
  path without ever producing a torn file (unique temporary names, atomic rename), but the file
  then holds whichever process wrote last, and a process restarting from it gets only that
  process's services. Give each process (or each group of identical processes) its own path.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from meshlib.telemetry import metrics

__all__ = ["FORMAT", "SnapshotFileWriter", "read_snapshot_file", "Export"]

log = logging.getLogger("meshlib.discovery")

FORMAT = "meshlib-snapshot/1"
_SLICE = 50  # services per export slice / per written chunk

#: ``export(services)`` -> ``(default_policy, {service: part or None if gone})``; ``services``
#: None means every service; a part is ``{"instances": {key: record JSON text}, "policy": doc,
#: "policy_revision": int}``. The store takes its own lock inside.
Export = Callable[[set[str] | None], tuple[dict[str, Any], dict[str, dict[str, Any] | None]]]


def read_snapshot_file(path: str, prefix: str) -> dict[str, Any] | None:
    """The document at ``path`` if it is a snapshot of ``prefix`` in this format, else None."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable snapshot file %s: %s", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        log.warning(
            "ignoring snapshot file %s: format %r, expected %r",
            path, doc.get("format") if isinstance(doc, dict) else None, FORMAT,
        )
        return None
    if doc.get("prefix") != prefix:
        log.warning(
            "ignoring snapshot file %s: written for key prefix %r, this mesh uses %r",
            path, doc.get("prefix"), prefix,
        )
        return None
    return doc


def _json_key(key: str) -> str:
    """``key`` as a JSON string: printable ASCII without quote or backslash (every etcd key
    meshlib writes) needs no escaping; anything else goes through ``json.dumps``."""
    if key.isascii() and key.isprintable() and '"' not in key and "\\" not in key:
        return '"' + key + '"'
    return json.dumps(key)


def _service_fragment(service: str, part: dict[str, Any]) -> str:
    """``"name": {...}`` for one service. ``part["instances"]`` maps keys to the records' JSON
    text as etcd holds it (validated JSON objects), embedded as they are: no re-encoding."""
    instances = part["instances"]
    members = ", ".join(_json_key(k) + ": " + instances[k] for k in sorted(instances))
    return (
        json.dumps(service) + ': {"instances": {' + members + '}, "policy": '
        + json.dumps(part.get("policy")) + ', "policy_revision": '
        + json.dumps(part.get("policy_revision") or 0) + "}"
    )


class SnapshotFileWriter:
    """Background writer of the snapshot file (see the module docstring).

    >>> w = SnapshotFileWriter("/var/lib/app/mesh.json", "/meshlib/v1", store_export)
    ... # doctest: +SKIP
    >>> w.mark("orders"); w.close()                      # doctest: +SKIP
    """

    def __init__(
        self, path: str, prefix: str, export: Export, *, interval: float = 1.0,
        name: str = "meshlib-snapshot-writer",
    ) -> None:
        if interval < 0:
            raise ValueError(f"snapshot_interval must be >= 0 seconds, got {interval!r}")
        self.path = os.path.abspath(path)
        self.prefix = prefix
        self.interval = float(interval)
        self._export = export
        self._lock = threading.Lock()  # guards the marks; held for set operations only
        self._write_lock = threading.Lock()  # one write at a time (writer thread or flush)
        self._dirty: set[str] = set()
        self._all = True  # the first write exports every service (including ones from a file)
        self._pending = False
        self._fragments: dict[str, str] = {}
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._last_write = 0.0
        self._marked = 0  # marks so far
        self._written = 0  # marks covered by the last successful write
        self._done = threading.Condition(self._lock)
        self.writes = 0  # successful writes
        self.write_seconds = 0.0  # total time spent in successful writes
        self.max_write_seconds = 0.0
        self.last_bytes = 0  # size of the last file written
        self._duration = metrics.SNAPSHOT_FILE_WRITE_DURATION.labels()
        self._ok = metrics.SNAPSHOT_FILE_WRITES.labels("ok")
        self._err = metrics.SNAPSHOT_FILE_WRITES.labels("error")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def mark(self, service: str | None) -> None:
        """Something of ``service`` changed (None: the default policy). Cheap; never blocks on I/O."""
        with self._lock:
            if service is not None:
                self._dirty.add(service)
            self._pending = True
            self._marked += 1
        self._wake.set()

    def wait_written(self, timeout: float | None = None) -> bool:
        """Block until every change marked before this call is in the file (or ``timeout``)."""
        with self._lock:
            target = self._marked
            return self._done.wait_for(lambda: self._written >= target, timeout)

    def flush(self) -> bool:
        """Write now what is pending (from the caller's thread); True when nothing is left."""
        self._write_pending()
        with self._lock:
            return not self._pending

    def close(self, timeout: float = 5.0) -> None:
        """Write what is still pending, then stop the thread."""
        self._closing.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("snapshot writer for %s did not stop within %.1fs", self.path, timeout)

    # ------------------------------------------------------------------ internals
    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._closing.is_set():
                break
            delay = self._last_write + self.interval - time.monotonic()
            if delay > 0 and self._closing.wait(delay):
                break
            self._wake.clear()
            self._write_pending()
        self._write_pending()

    def _write_pending(self) -> None:
        with self._write_lock:
            self._write_locked()

    def _write_locked(self) -> None:
        with self._lock:
            if not self._pending:
                return
            dirty, self._dirty = self._dirty, set()
            full, self._all = self._all, False
            self._pending = False
            covered = self._marked
        started = time.perf_counter()
        try:
            default_policy = self._update_fragments(None if full else dirty)
            header = json.dumps({
                "format": FORMAT, "prefix": self.prefix, "written_at": round(time.time(), 3),
                "default_policy": default_policy,
            })
            size = self._replace(self._chunks(header[:-1] + ', "services": {'))
        except (OSError, TypeError, ValueError) as exc:
            with self._lock:  # retry at the next interval, with the same services
                self._dirty |= dirty
                self._all = self._all or full
                self._pending = True
            self._wake.set()
            self._err.inc()  # type: ignore[attr-defined]
            log.warning(
                "could not write snapshot file %s: %s; retrying in %.1fs",
                self.path, exc, max(self.interval, 1.0),
            )
            self._last_write = time.monotonic() + max(0.0, 1.0 - self.interval)
            return
        self._last_write = time.monotonic()
        with self._lock:
            self._written = covered
            self._done.notify_all()
        took = time.perf_counter() - started
        self.writes += 1
        self.write_seconds += took
        self.max_write_seconds = max(self.max_write_seconds, took)
        self.last_bytes = size
        self._ok.inc()  # type: ignore[attr-defined]
        self._duration.observe(took)

    def _update_fragments(self, services: set[str] | None) -> dict[str, Any]:
        """Rebuild the fragments of ``services`` (None: all), exporting them from the store in
        slices so that neither the store's lock nor the interpreter lock is held for long."""
        if services is None:
            everything, parts = self._export(None)
            self._rebuild(parts)
            return everything
        names = sorted(services)
        default_policy: dict[str, Any] = {}
        for i in range(0, max(1, len(names)), _SLICE):
            default_policy, some = self._export(set(names[i:i + _SLICE]))
            self._rebuild(some)
        return default_policy

    def _rebuild(self, parts: dict[str, dict[str, Any] | None]) -> None:
        for n, (service, part) in enumerate(parts.items(), 1):
            if part is None:
                self._fragments.pop(service, None)
            else:
                self._fragments[service] = _service_fragment(service, part)
            if n % _SLICE == 0:
                time.sleep(0)  # hand the interpreter lock to the watch thread
        time.sleep(0)

    def _chunks(self, head: str) -> Iterator[str]:
        """The document in pieces of ``_SLICE`` services (no 2 MiB join on one GIL hold)."""
        yield head
        names = sorted(self._fragments)
        for i in range(0, len(names), _SLICE):
            sep = ", " if i else ""
            yield sep + ", ".join(self._fragments[s] for s in names[i:i + _SLICE])
            time.sleep(0)
        yield "}}\n"

    def _replace(self, chunks: Iterable[str]) -> int:
        """Write ``chunks`` to a temporary file beside ``path``, fsync it, rename it over
        ``path`` and fsync the directory (POSIX rename is atomic: readers see old or new, never
        a torn file). Returns the characters written."""
        directory, base = os.path.split(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
        size = 0
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:
            dfd = os.open(directory, os.O_RDONLY)
        except OSError:
            return size
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)
        return size
