"""What the sync (``channel.py``) and aio (``aio.py``) mesh channels share.

A mesh channel is a ``grpc.Channel`` / ``grpc.aio.Channel`` look-alike for one destination
service; its multicallables run the shared call plan and, per attempt, call the picked
endpoint's own grpcio multicallable (cached per endpoint and method; no interceptors). The
two flavours differ only in how they wait (blocking vs ``await``): a call's steps are
:class:`meshlib.grpc.driver.CallDriver`, and the channel and multicallable state lives here
once. Channels are typed against :class:`meshlib.ports.MeshPort`, the members of ``Mesh``
the drivers use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from meshlib.core.call import CallObserver
from meshlib.grpc.attempt import CALLER_KEY, RpcTelemetry
from meshlib.grpc.pool import ChannelPool

if TYPE_CHECKING:
    from meshlib.ports import MeshPort


class MultiCallableBase:
    """Shared state of one method's multicallable: the endpoint-callable cache."""

    __slots__ = ("_ch", "_dest", "_pool", "_kind", "_method", "_ser", "_deser", "_kw",
                 "_mcs", "_gen", "_service", "_observer", "_extra", "_replayable", "_tel")

    def __init__(self, ch: MeshChannelBase, kind: str, method: str | bytes, ser: Any,
                 deser: Any, kwargs: dict[str, Any], replayable: bool) -> None:
        self._ch = ch
        self._dest = ch._dest
        self._pool = ch._pool
        self._kind = kind
        self._method = method if isinstance(method, str) else method.decode()
        self._ser = ser
        self._deser = deser
        self._kw = kwargs
        self._mcs: dict[str, Any] = {}
        self._gen = -1
        self._service = ch.service
        self._observer = ch._observer
        self._extra = ch._extra
        self._replayable = replayable
        self._tel = RpcTelemetry(ch._recorder, ch.service, self._method)

    def _mc(self, ep: Any) -> Any:
        """The picked endpoint's own grpcio multicallable (cached)."""
        pool = self._pool
        mcs = self._mcs
        if pool.generation != self._gen:
            mcs = self._mcs = {}
            self._gen = pool.generation
        mc = mcs.get(ep.key)
        if mc is None:
            factory = getattr(pool.channel(ep), self._kind)
            mc = mcs[ep.key] = factory(self._method, request_serializer=self._ser,
                                       response_deserializer=self._deser, **self._kw)
        return mc


class MeshChannelBase:
    """Construction and the four multicallable factories of a mesh channel.

    Subclasses name their multicallable classes (``_UNARY_UNARY`` ...) and say whether
    their per-endpoint channels are ``grpc.aio`` ones (``_AIO``)."""

    _AIO = False
    _UNARY_UNARY: Any
    _UNARY_STREAM: Any
    _STREAM_UNARY: Any
    _STREAM_STREAM: Any

    def __init__(
        self,
        mesh: MeshPort,
        service: str,
        *,
        options: Any = None,
        compression: grpc.Compression | None = None,
        observer: CallObserver | None = None,
        drain_timeout: float = 30.0,
        health_check: bool = True,
        identity: Any = None,
    ) -> None:
        self.service = service
        self._dest = mesh.destination(service)
        self._pool = ChannelPool(mesh, service, options=options, compression=compression,
                                 aio=self._AIO, drain_timeout=drain_timeout, identity=identity)
        self._recorder = mesh.call_observer("grpc", service)
        self._observer = observer or self._recorder
        self._extra: tuple[tuple[str, str], ...] = (
            ((CALLER_KEY, mesh.service),) if mesh.service else ()
        )
        self._health: Any = None
        if health_check:
            from meshlib.grpc.health import HealthMonitor

            self._health = HealthMonitor.for_destination(mesh, self._dest, options=options)

    @property
    def destination(self) -> Any:
        return self._dest

    @property
    def pool(self) -> ChannelPool:
        return self._pool

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None, **kwargs: Any) -> Any:
        return self._UNARY_UNARY(self, "unary_unary", method, request_serializer,
                                 response_deserializer, kwargs, True)

    def unary_stream(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **kwargs: Any) -> Any:
        return self._UNARY_STREAM(self, "unary_stream", method, request_serializer,
                                  response_deserializer, kwargs, True)

    def stream_unary(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **kwargs: Any) -> Any:
        return self._STREAM_UNARY(self, "stream_unary", method, request_serializer,
                                  response_deserializer, kwargs, False)

    def stream_stream(self, method: str, request_serializer: Any = None,
                      response_deserializer: Any = None, **kwargs: Any) -> Any:
        return self._STREAM_STREAM(self, "stream_stream", method, request_serializer,
                                   response_deserializer, kwargs, False)

    def _release_health(self) -> None:
        if self._health is not None:
            self._health.release()
            self._health = None
