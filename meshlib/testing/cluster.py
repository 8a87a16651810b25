"""A real multi-member etcd cluster on loopback (:class:`EtcdCluster`).

Clusters use static bootstrap (etcd docs, "Clustering guide": ``--initial-cluster``,
``--initial-cluster-state=new`` and a cluster token unique to each cluster so two test clusters
can never join each other). All members are spawned first and then awaited together, so a
cluster is ready in about one election. A cluster's heartbeat and election timeout default to
50 / 500 ms (etcd: 100 / 1000 ms; the ratio of 10 follows etcd's tuning guide).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import grpc

from meshlib.testing.binaries import run_etcdctl
from meshlib.testing.errors import EtcdError
from meshlib.testing.process import log_tail, make_temp_dir, remove_temp_dir
from meshlib.testing.server import EtcdServer


class EtcdCluster:
    """A real multi-member etcd cluster on loopback (static bootstrap).

    Takes the options of :class:`EtcdServer` (``data_dir`` is the parent of the members'
    data dirs ``m0``, ``m1``, ...), except that ``heartbeat_interval_ms`` and
    ``election_timeout_ms`` default to 50 / 500 ms (etcd: 100 / 1000; raise them on a heavily
    loaded machine if spurious leader changes appear). Members are :class:`EtcdServer` objects
    with the same ``kill``/``stop``/``restart``/``running``/``endpoint`` API.

    Example::

        with EtcdCluster(3) as cluster:
            cluster.kill(cluster.leader_index())
            cluster.etcdctl("put", "/k", "v")  # the other two elect a new leader
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        data_dir: str | os.PathLike[str] | None = None,
        progress_notify_interval: str = "1s",
        heartbeat_interval_ms: int = 50,
        election_timeout_ms: int = 500,
        unsafe_no_fsync: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        if size < 1:
            raise ValueError(f"EtcdCluster size must be >= 1, got {size}")
        self.size = size
        self.host = host
        self._given_root = Path(data_dir) if data_dir is not None else None
        self._root: Path | None = None
        self._options: dict[str, Any] = dict(
            host=host,
            progress_notify_interval=progress_notify_interval,
            heartbeat_interval_ms=heartbeat_interval_ms,
            election_timeout_ms=election_timeout_ms,
            unsafe_no_fsync=unsafe_no_fsync,
            extra_args=extra_args,
        )
        self.members: list[EtcdServer] = []
        self._started = False

    @property
    def endpoints(self) -> list[str]:
        """``"127.0.0.1:PORT"`` of every member, running or not."""
        return [m.endpoint for m in self.members]

    @property
    def running_members(self) -> list[EtcdServer]:
        return [m for m in self.members if m.running]

    def _build(self) -> None:
        if self._given_root is not None:
            self._root = self._given_root
            self._root.mkdir(parents=True, exist_ok=True)
        else:
            self._root = make_temp_dir("meshlib-etcd-cluster-")
        self.members = []
        for i in range(self.size):
            m = EtcdServer(name=f"m{i}", data_dir=self._root / f"m{i}", **self._options)
            m._member_log = self._root / f"m{i}.log"
            m._assign_ports()
            self.members.append(m)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"meshlib-{uuid.uuid4().hex[:16]}"
        for m in self.members:
            m._cluster_flags = [
                f"--initial-cluster={initial}",
                f"--initial-cluster-token={token}",
                "--initial-cluster-state=new",
            ]

    def _discard(self) -> None:
        for m in self.members:
            m.stop(timeout=0)
        if self._given_root is None:
            remove_temp_dir(self._root)
        elif self._root is not None:
            for i in range(self.size):
                shutil.rmtree(self._root / f"m{i}", ignore_errors=True)
        self._root = None

    def start(self, timeout: float = 30) -> Self:
        """Spawn all members at once and wait until each serves a linearizable read."""
        if self._started:
            for m in self.members:
                if not m.running:
                    m._spawn()
            deadline = time.monotonic() + timeout
            for m in self.members:
                m._wait_ready(deadline)
            return self
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._build()
            for m in self.members:
                m._spawn()
            try:
                for m in self.members:
                    m._wait_ready(deadline)
            except EtcdError as e:
                logs = {m.name: log_tail(m._log_path, 50) for m in self.members}
                in_use = any("address already in use" in t for t in logs.values())
                self._discard()
                if in_use and attempt < 2:
                    continue
                details = "\n".join(f"--- {n}:\n{t}" for n, t in logs.items())
                raise EtcdError(
                    f"etcd cluster of {self.size} failed to start: {e}\n{details}"
                ) from e
            self._started = True
            return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 2) -> None:
        """Stop every member (SIGTERM to all at once, SIGKILL after ``timeout``), remove data.

        A member stopping gracefully waits about a second for its peers, so ``timeout`` is
        short by default; tests that do not need a graceful stop use :meth:`kill_all`.
        """
        procs = [m._proc for m in self.members if m.running]
        for p in procs:
            if p is not None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for m in self.members:
            m._stop_process(term_timeout=max(0.0, end - time.monotonic()))
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL every member and remove the cluster's data (the fast teardown for tests)."""
        for m in self.members:
            m._stop_process(term_timeout=None)
        self._discard()
        self._started = False

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (its data stays, so :meth:`restart` rejoins it)."""
        self.members[i].kill()

    def restart(self, i: int, timeout: float = 20) -> EtcdServer:
        """Restart member ``i`` on the same ports and data; returns when it serves reads again."""
        return self.members[i].restart(timeout)

    def leader_index(self, timeout: float = 10) -> int:
        """Index of the member that reports itself leader (``Status.leader == member_id``).

        Polls the running members until one does or ``timeout`` passes.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.members):
                if not m.running:
                    continue
                try:
                    st = m.status(timeout=0.5)
                except grpc.RpcError:
                    continue
                if st.leader != 0 and st.leader == st.header.member_id:
                    return i
            if time.monotonic() >= deadline:
                raise EtcdError(
                    f"no leader among running members {[m.name for m in self.running_members]} "
                    f"within {timeout}s"
                )
            time.sleep(0.05)

    def _first_ok(self, what: str, fn: Callable[[EtcdServer], int]) -> int:
        errors = []
        for m in self.running_members:
            try:
                return fn(m)
            except EtcdError as e:
                errors.append(str(e))
        raise EtcdError(f"{what} failed on every running member: {errors or 'none running'}")

    def revision(self) -> int:
        return self._first_ok("reading the revision", lambda m: m.revision())

    def compact(self, revision: int | None = None) -> int:
        """Compact (physically) to ``revision`` or the current revision; returns it."""
        return self._first_ok("compaction", lambda m: m.compact(revision))

    def etcdctl(
        self, *args: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``etcdctl`` with ``--endpoints`` set to the running members.

        etcdctl's client sticks to the first endpoint it reaches, and a SIGKILLed member's
        port just times out, so killed members are left out.
        """
        endpoints = [m.endpoint for m in self.running_members] or self.endpoints
        return run_etcdctl(endpoints, args, check=check, timeout=timeout, input=input)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def __repr__(self) -> str:
        return f"<EtcdCluster size={self.size} members={self.members!r}>"

