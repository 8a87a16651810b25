"""Real etcd processes for tests: one server, a static multi-member cluster, the gRPC proxy.

meshlib never mocks etcd in tests: watch resume, compaction, leases and leader failover are
exactly the behaviours a fake gets wrong. These helpers start the real ``etcd`` binary on
loopback. One module per concern:

* :mod:`meshlib.testing.process`: child-process control (free ports, spawn with PDEATHSIG,
  reap, the registry that kills every child at exit or on SIGTERM/SIGINT, temp dirs);
* :mod:`meshlib.testing.binaries`: finding ``etcd``/``etcdctl``, running ``etcdctl``;
* :mod:`meshlib.testing.member`: what a server and the proxy share (gRPC probe, revision,
  compaction);
* :mod:`meshlib.testing.server`, :mod:`~meshlib.testing.cluster`,
  :mod:`~meshlib.testing.proxy`: :class:`EtcdServer`, :class:`EtcdCluster`,
  :class:`EtcdGrpcProxy`.

This module re-exports them all, so ``from meshlib.testing.etcd import EtcdServer`` keeps
working; new code imports from :mod:`meshlib.testing`.
"""

from __future__ import annotations

from meshlib.testing.binaries import find_etcd_binary
from meshlib.testing.cluster import EtcdCluster
from meshlib.testing.errors import EtcdctlError, EtcdError, EtcdNotFound
from meshlib.testing.process import free_port, kill_all_children, live_children, pdeathsig_prefix
from meshlib.testing.proxy import EtcdGrpcProxy
from meshlib.testing.server import EtcdServer

_pdeathsig_prefix = pdeathsig_prefix  # the name callers used before the split

__all__ = [
    "EtcdCluster",
    "EtcdError",
    "EtcdGrpcProxy",
    "EtcdNotFound",
    "EtcdServer",
    "EtcdctlError",
    "find_etcd_binary",
    "free_port",
    "kill_all_children",
    "live_children",
    "pdeathsig_prefix",
]
