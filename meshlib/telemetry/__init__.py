"""meshlib telemetry: Prometheus series defined once (:mod:`.semconv`, :mod:`.metrics`), the
recorders drivers call (:mod:`.recorders`), OpenTelemetry spans and propagation
(:mod:`.tracing`) and metrics exposition (:mod:`.exposition`). See docs/metrics.md and
docs/tracing.md."""

from meshlib.telemetry.exposition import (
    metrics_asgi_app,
    metrics_wsgi_app,
    start_metrics_server,
)
from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.recorders import (
    ClientRecorder,
    HttpClientRecorder,
    HttpServerRecorder,
    RpcClientRecorder,
    RpcMethodRecorder,
    RpcServerRecorder,
    error_type_of,
    split_full_method,
)

__all__ = [
    "ClientRecorder",
    "HttpClientRecorder",
    "HttpServerRecorder",
    "MeshMetrics",
    "RpcClientRecorder",
    "RpcMethodRecorder",
    "RpcServerRecorder",
    "error_type_of",
    "metrics_asgi_app",
    "metrics_wsgi_app",
    "split_full_method",
    "start_metrics_server",
]
