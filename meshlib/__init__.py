"""meshlib: a library-style service mesh for Python.

The public API is :class:`Mesh` (imported lazily so that ``import meshlib.core`` stays
free of etcd and gRPC). Drivers, and anything that builds one without a whole ``Mesh``,
depend only on :class:`meshlib.ports.MeshPort`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlib.mesh import Mesh, MeshTimeout

__all__ = ["Mesh", "MeshTimeout"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from meshlib import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module 'meshlib' has no attribute {name!r}")
