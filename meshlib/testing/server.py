"""One real etcd member on loopback (:class:`EtcdServer`).

How a server is started
    1. Pick free loopback ports for the client and peer URLs (bind port 0, read it back, close).
       Another process can take the port in between; a start that fails with "address already
       in use" is retried on new ports while the data directory is still fresh.
    2. Spawn ``etcd`` with ``--log-level=error`` and its output in a log file in the temp dir,
       ``--experimental-watch-progress-notify-interval`` (default 1 s instead of etcd's 10 min,
       so watch progress notifications are observable in tests) and ``--unsafe-no-fsync``
       (default on: a SIGKILLed etcd loses nothing, since its writes are in the page cache;
       only a machine crash would).
    3. Wait until it serves a linearizable read (:class:`~meshlib.testing.member.EtcdProcess`).

A single server uses a heartbeat / election timeout of 10 / 100 ms (etcd: 100 / 1000 ms),
harmless without peers, so it elects itself in ~0.1 s.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

from meshlib.testing.binaries import find_etcd_binary
from meshlib.testing.errors import EtcdError
from meshlib.testing.member import EtcdProcess
from meshlib.testing.process import free_port, log_tail, make_temp_dir, reap, remove_temp_dir, spawn


class EtcdServer(EtcdProcess):
    """One etcd member on loopback; a one-member cluster unless it belongs to an EtcdCluster.

    Args:
        name: member name (``--name``).
        host: loopback address to listen on.
        data_dir: where etcd keeps its data. Default: a temp dir, removed by :meth:`stop`.
            A directory given here is never removed.
        progress_notify_interval: ``--experimental-watch-progress-notify-interval`` (etcd's
            default is 10m; 1s lets tests see progress notifications).
        heartbeat_interval_ms / election_timeout_ms: raft timing, default 10 / 100 ms
            (etcd: 100 / 1000). A lone member has no peers to miss heartbeats from, so these
            only decide how soon it elects itself at start (~0.1 s instead of ~0.5 s).
            :class:`EtcdCluster` passes its own (50 / 500 ms) to its members.
        unsafe_no_fsync: pass ``--unsafe-no-fsync`` (default True; safe against process kills).
        extra_args: more etcd flags, appended last.

    Example::

        with EtcdServer() as etcd:
            etcd.etcdctl("put", "/a", "1")
            assert etcd.etcdctl("get", "/a", "--print-value-only").stdout == "1\\n"
    """

    def __init__(
        self,
        *,
        name: str = "m0",
        host: str = "127.0.0.1",
        data_dir: str | os.PathLike[str] | None = None,
        progress_notify_interval: str = "1s",
        heartbeat_interval_ms: int = 10,
        election_timeout_ms: int = 100,
        unsafe_no_fsync: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(host)
        self.name = name
        self._label = f"etcd member {name!r}"
        self._given_data_dir = Path(data_dir) if data_dir is not None else None
        self.progress_notify_interval = progress_notify_interval
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.unsafe_no_fsync = unsafe_no_fsync
        self.extra_args = list(extra_args)
        self._peer_port: int | None = None
        self._work_dir: Path | None = None  # temp dir: log (+ data unless data_dir was given)
        self._started_once = False
        # Set by EtcdCluster for its members:
        self._cluster_flags: list[str] | None = None
        self._member_log: Path | None = None

    # -- paths and addresses
    @property
    def peer_url(self) -> str:
        if self._peer_port is None:
            raise EtcdError(f"{self._label} has no peer port yet: call start() first")
        return f"http://{self.host}:{self._peer_port}"

    @property
    def data_dir(self) -> Path | None:
        if self._given_data_dir is not None:
            return self._given_data_dir
        return None if self._work_dir is None else self._work_dir / "data"

    def _assign_ports(self) -> None:
        if self._port is None or self._peer_port is None:
            self._port = free_port(self.host)
            self._peer_port = free_port(self.host)

    def _argv(self) -> list[str]:
        data_dir = self.data_dir
        assert data_dir is not None
        cluster = self._cluster_flags or [
            f"--initial-cluster={self.name}={self.peer_url}",
            f"--initial-cluster-token=meshlib-{uuid.uuid4().hex[:16]}",
            "--initial-cluster-state=new",
        ]
        argv = [
            find_etcd_binary("etcd"),
            f"--name={self.name}",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            *cluster,
            f"--heartbeat-interval={self.heartbeat_interval_ms}",
            f"--election-timeout={self.election_timeout_ms}",
            f"--experimental-watch-progress-notify-interval={self.progress_notify_interval}",
            "--log-level=error",
            f"--log-outputs={self._log_path}",
        ]
        if self.unsafe_no_fsync:
            argv.append("--unsafe-no-fsync")
        return argv + self.extra_args

    def _spawn(self) -> None:
        """Start the process without waiting for it (EtcdCluster awaits its members together)."""
        if self.running:
            return
        self._close_channel()
        needs_work_dir = self._given_data_dir is None or self._member_log is None
        if self._work_dir is None and needs_work_dir:
            self._work_dir = make_temp_dir(f"meshlib-etcd-{self.name}-")
        self._log_path = self._member_log
        if self._log_path is None:
            assert self._work_dir is not None
            self._log_path = self._work_dir / "etcd.log"
        self._assign_ports()
        self._proc = spawn(self._argv(), self._log_path)

    def _data_is_fresh(self) -> bool:
        d = self.data_dir
        return d is None or not d.exists() or not any(d.iterdir())

    def start(self, timeout: float = 20) -> Self:
        """Start etcd and wait until it serves linearizable reads. Returns ``self``."""
        if self.running:
            return self
        retry_ports = not self._started_once and self._cluster_flags is None
        fresh = self._data_is_fresh()
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_ready(deadline)
            except EtcdError:
                in_use = "address already in use" in log_tail(self._log_path, 50)
                self._stop_process(term_timeout=None)
                if retry_ports and fresh and in_use and attempt < 2:
                    self._port = self._peer_port = None
                    if self.data_dir is not None:
                        shutil.rmtree(self.data_dir, ignore_errors=True)
                    continue
                raise
            self._started_once = True
            return self
        raise AssertionError("unreachable")

    def _stop_process(self, term_timeout: float | None) -> None:
        self._close_channel()
        if self._proc is not None:
            reap(self._proc, term_timeout)

    def stop(self, timeout: float = 10, *, keep_data: bool = False) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Removes the temp dir unless
        ``keep_data`` (a ``data_dir`` given by the caller is never removed)."""
        self._stop_process(term_timeout=timeout)
        if not keep_data:
            remove_temp_dir(self._work_dir)
            self._work_dir = None
            if self._cluster_flags is None:
                self._port = self._peer_port = None  # fresh data: new ports next time
                self._started_once = False

    def kill(self) -> None:
        """SIGKILL and wait for the exit. Data is kept, so :meth:`restart` resumes it."""
        self._stop_process(term_timeout=None)

    def restart(self, timeout: float = 20) -> Self:
        """Stop (if running) and start again on the same ports with the same data dir."""
        if self._port is None:
            return self.start(timeout)
        self._stop_process(term_timeout=10)
        self._started_once = True
        return self.start(timeout)

    def status(self, timeout: float = 2) -> rpc_pb2.StatusResponse:
        """Maintenance.Status of this member (``header.member_id``, ``leader``, ...)."""
        stub = rpc_pb2_grpc.MaintenanceStub(self._channel())
        return stub.Status(rpc_pb2.StatusRequest(), timeout=timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

