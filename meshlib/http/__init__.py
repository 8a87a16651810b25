"""httpx drivers: ``MeshTransport`` (sync) and ``AsyncMeshTransport`` (asyncio)."""

from meshlib.http.errors import (
    CircuitOpenError,
    ConcurrencyLimitError,
    DeadlineExceededError,
    MeshHTTPError,
    NoEndpointsError,
    NotAMeshServiceError,
    RetryBudgetExhaustedError,
    UnsupportedSchemeError,
)
from meshlib.http.transport import AsyncMeshTransport, MeshTransport

__all__ = [
    "AsyncMeshTransport",
    "CircuitOpenError",
    "ConcurrencyLimitError",
    "DeadlineExceededError",
    "MeshHTTPError",
    "MeshTransport",
    "NoEndpointsError",
    "NotAMeshServiceError",
    "RetryBudgetExhaustedError",
    "UnsupportedSchemeError",
]
