"""``etcd grpc-proxy`` as a child process (:class:`EtcdGrpcProxy`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from meshlib.testing.binaries import find_etcd_binary
from meshlib.testing.cluster import EtcdCluster
from meshlib.testing.errors import EtcdError
from meshlib.testing.member import EtcdProcess
from meshlib.testing.process import free_port, log_tail, make_temp_dir, reap, remove_temp_dir, spawn
from meshlib.testing.server import EtcdServer


class EtcdGrpcProxy(EtcdProcess):
    """``etcd grpc-proxy start``: etcd's stateless L7 proxy that coalesces watches.

    ``endpoints`` are ``"host:port"`` strings or an object with an ``endpoints`` attribute
    (an :class:`EtcdServer` or :class:`EtcdCluster`).
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str | EtcdServer | EtcdCluster,
        *,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(host)
        if isinstance(endpoints, str):
            self.backends = [endpoints]
        elif isinstance(endpoints, EtcdServer | EtcdCluster):
            self.backends = list(endpoints.endpoints)
        else:
            self.backends = list(endpoints)
        if not self.backends:
            raise ValueError("EtcdGrpcProxy needs at least one etcd endpoint")
        self.extra_args = list(extra_args)
        self._work_dir: Path | None = None
        self._label = "etcd grpc-proxy"

    def start(self, timeout: float = 20) -> Self:
        """Start the proxy and wait until a linearizable read through it succeeds."""
        if self.running:
            return self
        self._work_dir = make_temp_dir("meshlib-etcd-proxy-")
        self._log_path = self._work_dir / "proxy.log"
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._port = free_port(self.host)
            argv = [
                find_etcd_binary("etcd"),
                "grpc-proxy",
                "start",
                "--endpoints=" + ",".join(self.backends),
                f"--listen-addr={self.endpoint}",
                f"--advertise-client-url={self.endpoint}",
                f"--data-dir={self._work_dir / 'proxy-data'}",
                *self.extra_args,
            ]
            self._close_channel()
            self._proc = spawn(argv, self._log_path)
            try:
                self._wait_ready(deadline)
                return self
            except EtcdError:
                in_use = "address already in use" in log_tail(self._log_path, 50)
                self._close_channel()
                reap(self._proc, None)
                if not (in_use and attempt < 2):
                    remove_temp_dir(self._work_dir)
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; removes the temp dir."""
        self._close_channel()
        if self._proc is not None:
            reap(self._proc, timeout)
        remove_temp_dir(self._work_dir)
        self._work_dir = None

    def kill(self) -> None:
        self._close_channel()
        if self._proc is not None:
            reap(self._proc, None)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
