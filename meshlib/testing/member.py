"""What a server, a cluster member and the gRPC proxy share: one child process on one port,
a gRPC channel to it, the readiness probe, ``revision``/``compact`` and ``etcdctl``.

Ready means a *linearizable* Range through the process's own gRPC port succeeds: that needs a
leader and a quorum read index, which is what etcd's own ``/health`` check does (etcd docs,
"Monitoring etcd" / ``etcdserver/api/etcdhttp/metrics.go``). It reads the key ``health`` and
writes nothing, so the store starts at revision 1.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

from meshlib.testing.binaries import run_etcdctl
from meshlib.testing.errors import EtcdError
from meshlib.testing.process import log_tail

_GRPC_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # never route loopback test traffic through $http_proxy
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
]


class EtcdProcess:
    """What a server, a cluster member and the gRPC proxy share: one child process on one port."""

    host: str
    _port: int | None
    _proc: subprocess.Popen[bytes] | None
    _channel_obj: grpc.Channel | None
    _log_path: Path | None
    _label: str

    def __init__(self, host: str) -> None:
        self.host = host
        self._port = None
        self._proc = None
        self._channel_obj = None
        self._log_path = None

    # -- addresses
    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:PORT"`` of the client (gRPC) port."""
        if self._port is None:
            raise EtcdError(f"{self._label} has no port yet: call start() first")
        return f"{self.host}:{self._port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint]

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """etcd's log file (errors only), while the process's temp dir exists."""
        return self._log_path

    # -- gRPC
    def _channel(self) -> grpc.Channel:
        if self._channel_obj is None:
            self._channel_obj = grpc.insecure_channel(self.endpoint, options=_GRPC_OPTIONS)
        return self._channel_obj

    def _close_channel(self) -> None:
        if self._channel_obj is not None:
            self._channel_obj.close()
            self._channel_obj = None

    def _kv(self) -> rpc_pb2_grpc.KVStub:
        return rpc_pb2_grpc.KVStub(self._channel())

    def _probe(self, timeout: float) -> bool:
        """True when a linearizable read succeeds (leader elected, quorum reachable)."""
        try:
            self._kv().Range(
                rpc_pb2.RangeRequest(key=b"health"), timeout=timeout, wait_for_ready=True
            )
            return True
        except grpc.RpcError:
            return False

    def _wait_ready(self, deadline: float) -> None:
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise EtcdError(
                    f"{self._label} exited with code {code} while starting; "
                    f"log {self._log_path}:\n{log_tail(self._log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdError(
                    f"{self._label} on {self.endpoint} was not ready within the start timeout; "
                    f"log {self._log_path}:\n{log_tail(self._log_path)}"
                )
            if self._probe(min(0.5, max(remaining, 0.05))):
                return
            time.sleep(0.01)

    def revision(self) -> int:
        """The current store revision (header of a linearizable Range)."""
        try:
            resp = self._kv().Range(rpc_pb2.RangeRequest(key=b"\0", count_only=True), timeout=5)
        except grpc.RpcError as e:
            raise EtcdError(
                f"reading the revision from {self.endpoint} failed: {_rpc_err(e)}"
            ) from e
        return int(resp.header.revision)

    def compact(self, revision: int | None = None) -> int:
        """Compact the key-value history up to ``revision`` (default: the current revision).

        Physical compaction: the call returns after the old revisions are removed from the
        backend, so a Range or Watch at an older revision then fails with "compacted".
        """
        rev = self.revision() if revision is None else int(revision)
        try:
            self._kv().Compact(rpc_pb2.CompactionRequest(revision=rev, physical=True), timeout=10)
        except grpc.RpcError as e:
            raise EtcdError(
                f"compacting to revision {rev} on {self.endpoint} failed: {_rpc_err(e)}"
            ) from e
        return rev

    # -- etcdctl
    def etcdctl(
        self, *args: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl`` (API v3) against this process's endpoints; text output.

        ``--endpoints`` is added unless ``args`` contain one. With ``check`` a non-zero exit
        raises :class:`EtcdctlError` carrying stderr.
        """
        return run_etcdctl(self.endpoints, args, check=check, timeout=timeout, input=input)

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self._label} {self.host}:{port} {state}>"


def _rpc_err(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{getattr(code, 'name', code)}: {details}"

