"""httpx drivers: ``MeshTransport`` (sync) and ``AsyncMeshTransport`` (asyncio).

The async driver is written once in ``meshlib/http/_async/``; the sync one in
``meshlib/http/_sync/`` is generated from it (``scripts/unasync.py``); the I/O that differs
lives by hand in ``meshlib/http/backends/``.
"""

from meshlib.http._async.transport import AsyncMeshTransport
from meshlib.http._sync.transport import MeshTransport
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
