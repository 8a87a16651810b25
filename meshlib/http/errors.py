"""Mesh failures as httpx exceptions, so ``except httpx.HTTPError`` keeps working.

Each names the destination service and why; ``reason`` is the stable string also used
as the ``error_type`` metric label.
"""

from __future__ import annotations

import httpx


class MeshHTTPError(httpx.TransportError):
    """Base of the mesh's own failures (not an upstream's answer)."""

    reason = "mesh_error"

    def __init__(self, message: str, *, service: str, request: httpx.Request | None = None):
        super().__init__(message, request=request)
        self.service = service


class NoEndpointsError(MeshHTTPError, httpx.ConnectError):
    """The destination has no endpoints (none registered, or the routed subset is empty)."""

    reason = "no_endpoints"


class CircuitOpenError(MeshHTTPError, httpx.ConnectError):
    """Every endpoint is ejected or has an open circuit breaker: failing fast."""

    reason = "circuit_open"


class ConcurrencyLimitError(MeshHTTPError):
    """The destination's ``concurrency.max_requests`` are already in flight."""

    reason = "concurrency_limit"


class RetryBudgetExhaustedError(MeshHTTPError):
    """An attempt failed and the retry it called for was refused by the retry budget."""

    reason = "retry_budget_exhausted"


class DeadlineExceededError(MeshHTTPError, httpx.TimeoutException):
    """The call's overall deadline passed (across all attempts)."""

    reason = "deadline_exceeded"


class NotAMeshServiceError(MeshHTTPError, httpx.UnsupportedProtocol):
    """The host is not a mesh service and the transport was built with ``passthrough=False``."""

    reason = "not_a_mesh_service"


class UnsupportedSchemeError(MeshHTTPError, httpx.UnsupportedProtocol):
    """A mesh service was addressed with a scheme other than ``http`` (e.g. ``https://orders/``):
    endpoints are reached over plain HTTP/1.1, so the request is refused rather than sent in
    clear text."""

    reason = "unsupported_scheme"


BY_FAILURE: dict[str, type[MeshHTTPError]] = {
    "no_endpoints": NoEndpointsError,
    "circuit_open": CircuitOpenError,
    "concurrency_limit": ConcurrencyLimitError,
    "deadline_exceeded": DeadlineExceededError,
}
