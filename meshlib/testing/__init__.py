"""Testing helpers: a real etcd (server, cluster, gRPC proxy) and a pytest plugin.

``meshlib.testing.plugin`` is registered as a pytest plugin (entry point ``pytest11``), so the
fixtures ``etcd``, ``etcd_server``, ``etcd_cluster`` and ``etcd_prefix`` are available in any
project that installs meshlib. See ``docs/testing.md``.
"""

from meshlib.testing.etcd import (
    EtcdCluster,
    EtcdctlError,
    EtcdError,
    EtcdGrpcProxy,
    EtcdNotFound,
    EtcdServer,
    find_etcd_binary,
    free_port,
    kill_all_children,
    live_children,
)

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
]
