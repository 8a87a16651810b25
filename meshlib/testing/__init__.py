"""Testing helpers: a real etcd (server, cluster, gRPC proxy) and a pytest plugin.

``meshlib.testing.plugin`` is registered as a pytest plugin (entry point ``pytest11``), so the
fixtures ``etcd``, ``etcd_server``, ``etcd_cluster``, ``etcd_prefix`` and ``mesh`` are available
in any project that installs meshlib. See ``docs/testing.md``.

The names below are imported on first use (PEP 562 ``__getattr__``): every pytest run in an
environment with meshlib loads the plugin, and so this package, and should not pay for grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlib.testing.binaries import find_etcd_binary
    from meshlib.testing.cluster import EtcdCluster
    from meshlib.testing.errors import EtcdctlError, EtcdError, EtcdNotFound
    from meshlib.testing.process import free_port, kill_all_children, live_children
    from meshlib.testing.proxy import EtcdGrpcProxy
    from meshlib.testing.server import EtcdServer

_HOMES = {
    "EtcdCluster": "cluster",
    "EtcdError": "errors",
    "EtcdGrpcProxy": "proxy",
    "EtcdNotFound": "errors",
    "EtcdServer": "server",
    "EtcdctlError": "errors",
    "find_etcd_binary": "binaries",
    "free_port": "process",
    "kill_all_children": "process",
    "live_children": "process",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'meshlib.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"meshlib.testing.{home}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
