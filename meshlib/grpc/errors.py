"""Mesh failures as gRPC errors, so ``except grpc.RpcError`` keeps working.

A failure of the mesh itself (no endpoint to send to, every breaker open, the concurrency
limit, the overall deadline, the retry budget) is raised as a :class:`MeshRpcError` (sync)
or :class:`MeshAioRpcError` (``grpc.aio``; a subclass of ``grpc.aio.AioRpcError``). Both
implement ``grpc.Call``'s ``code()``, ``details()``, ``initial_metadata()`` and
``trailing_metadata()``, carry ``service`` and ``reason`` (the stable string also used as the
``error_type`` metric label), and name the service and the cause in ``details()``.

Status codes follow what gRPC itself reports for the same situations (gRPC status code
guide, "statuscodes.md"): no endpoint / all ejected -> UNAVAILABLE (no connection could be
made), concurrency limit -> RESOURCE_EXHAUSTED (a local limit), deadline ->
DEADLINE_EXCEEDED, retry budget exhausted -> the last attempt's status.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

_EMPTY_MD: tuple[Any, ...] = ()

#: ``CallEnd.failure`` -> (status code, reason).
FAILURE_CODES: dict[str, grpc.StatusCode] = {
    "no_endpoints": grpc.StatusCode.UNAVAILABLE,
    "circuit_open": grpc.StatusCode.UNAVAILABLE,
    "concurrency_limit": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
}

CODE_BY_NAME: dict[str, grpc.StatusCode] = {c.name: c for c in grpc.StatusCode}


def code_from_name(name: str) -> grpc.StatusCode:
    """``"unavailable"`` / ``"deadline-exceeded"`` / ``"UNAVAILABLE"`` -> ``grpc.StatusCode``."""
    return CODE_BY_NAME.get(name.strip().upper().replace("-", "_"), grpc.StatusCode.UNKNOWN)


class MeshRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A call the mesh failed by itself (sync API). Terminal: ``is_active()`` is False."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        service: str,
        reason: str,
        initial_metadata: Any = _EMPTY_MD,
        trailing_metadata: Any = _EMPTY_MD,
    ) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self.service = service
        self.reason = reason
        self._initial = initial_metadata
        self._trailing = trailing_metadata

    # grpc.Call / grpc.RpcContext
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return self._initial

    def trailing_metadata(self) -> Any:
        return self._trailing

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    def debug_error_string(self) -> str:
        return f"meshlib: {self.reason}: {self._details}"

    def __str__(self) -> str:
        return (f"<{type(self).__name__} of RPC that terminated with:\n"
                f"\tstatus = {self._code}\n\tdetails = \"{self._details}\"\n>")

    __repr__ = __str__


class MeshAioRpcError(grpc.aio.AioRpcError):
    """A call the mesh failed by itself (``grpc.aio`` API)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        service: str,
        reason: str,
        initial_metadata: Any = None,
        trailing_metadata: Any = None,
    ) -> None:
        super().__init__(
            code,
            initial_metadata if initial_metadata is not None else grpc.aio.Metadata(),
            trailing_metadata if trailing_metadata is not None else grpc.aio.Metadata(),
            details=details,
            debug_error_string=f"meshlib: {reason}: {details}",
        )
        self.service = service
        self.reason = reason


def mesh_error(
    failure: str,
    message: str,
    service: str,
    *,
    aio: bool,
    code: grpc.StatusCode | None = None,
    initial_metadata: Any = None,
    trailing_metadata: Any = None,
) -> grpc.RpcError:
    """The exception for a mesh failure (``failure`` is a ``FailureKind`` or
    ``"retry_budget_exhausted"`` / ``"fault_abort"``, with ``code`` given)."""
    c = code if code is not None else FAILURE_CODES.get(failure, grpc.StatusCode.UNAVAILABLE)
    if aio:
        return MeshAioRpcError(c, message, service=service, reason=failure,
                               initial_metadata=initial_metadata,
                               trailing_metadata=trailing_metadata)
    return MeshRpcError(c, message, service=service, reason=failure,
                        initial_metadata=initial_metadata or _EMPTY_MD,
                        trailing_metadata=trailing_metadata or _EMPTY_MD)
