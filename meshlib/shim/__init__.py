"""The sidecar shim: the mesh for services in any language (docs/shim.md).

It runs the same call plan (``meshlib.core.call.run_call``), policies, metric families and
trace rules as the library, as one more driver: ``outbound.py`` (HTTP proxy),
``grpc_proxy.py``, ``grpc_forward.py``, ``grpc_loop.py`` (gRPC upstream listeners), ``inbound.py`` (optional inbound port),
``registrar.py`` (the app's registration and health checks), ``admin.py``, ``app.py``
(lifecycle), ``config.py`` (flags, environment, file).
"""

from meshlib.shim.config import ConfigError, ShimConfig, UpstreamSpec, load_config

__all__ = ["ConfigError", "ShimConfig", "UpstreamSpec", "load_config"]
