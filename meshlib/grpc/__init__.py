"""gRPC through the mesh: ``OrdersStub(mesh.grpc_channel("orders"))``.

:class:`MeshChannel` (sync grpcio) and :class:`AioMeshChannel` (``grpc.aio``) pick an
endpoint per attempt with the shared call plan (``meshlib.core.call``) and send the attempt on
that endpoint's own channel (:mod:`.pool`). See ``docs/grpc.md``.
"""

from meshlib.grpc.aio import AioMeshChannel
from meshlib.grpc.channel import MeshChannel
from meshlib.grpc.errors import MeshAioRpcError, MeshRpcError
from meshlib.grpc.health import add_health_servicer

__all__ = [
    "AioMeshChannel",
    "MeshAioRpcError",
    "MeshChannel",
    "MeshRpcError",
    "add_health_servicer",
]
