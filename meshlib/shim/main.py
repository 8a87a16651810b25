"""``meshlib shim`` / ``python -m meshlib.shim``: run the shim, or wait for one
(``meshlib await`` is ``--wait``).

``--wait [-- CMD ARGS]`` does not start a shim: it polls ``/ready`` on the admin port of the
shim started beside it until it answers 200 (at most ``--wait-timeout`` seconds), then runs
``CMD`` in its place (``exec``), so an app's entrypoint starts only once its sidecar is ready
(Istio's ``holdApplicationUntilProxyStarts``, linkerd-await). Exit statuses: 0 ready (or
CMD's own status), 1 not ready in time, 2 bad configuration.
"""

from __future__ import annotations

import http.client
import logging
import os
import sys
import time
from collections.abc import Sequence

from meshlib.shim.config import ConfigError, ShimConfig, load_config


def wait_ready(host: str, port: int, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``http://host:port/ready`` until 200 or ``timeout`` seconds (no proxy is used:
    ``http.client`` talks to the address directly)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=max(interval, 1.0))
            try:
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    return True
            finally:
                conn.close()
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _admin_host(cfg: ShimConfig) -> str:
    return "127.0.0.1" if cfg.bind in ("0.0.0.0", "") else ("::1" if cfg.bind == "::"
                                                           else cfg.bind)


def run_wait(cfg: ShimConfig, timeout: float, command: Sequence[str]) -> int:
    host = _admin_host(cfg)
    if not wait_ready(host, cfg.admin_port, timeout):
        print(f"meshlib shim --wait: the shim on {host}:{cfg.admin_port} was not ready after "
              f"{timeout}s (see its /ready)", file=sys.stderr)
        return 1
    if command:
        try:
            os.execvp(command[0], list(command))
        except OSError as exc:
            print(f"meshlib shim --wait: cannot run {command[0]!r}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 127
    return 0


#: Proxy settings honoured by httpx, grpcio (the etcd client, gRPC upstreams) and urllib.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                   "all_proxy", "grpc_proxy", "GRPC_PROXY")


def ignore_proxy_environment() -> list[str]:
    """Remove proxy variables from this process's environment: the app's container often
    sets ``HTTP_PROXY`` to the shim itself, and the shim's own traffic (etcd, endpoints)
    must never go through it (a loop) or through any other proxy."""
    removed = [v for v in PROXY_VARIABLES if v in os.environ]
    for v in removed:
        del os.environ[v]
    if removed:
        logging.getLogger("meshlib.shim").info(
            "ignoring %s: the shim's own connections never use a proxy", ", ".join(removed))
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, ns = load_config(argv)
    except ConfigError as exc:
        print(f"meshlib shim: {exc}", file=sys.stderr)
        return 2
    command = list(ns.command or [])
    if command and command[0] == "--":
        command = command[1:]
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(cfg.log_level.upper())  # also under ``meshlib shim``
    if ns.wait:
        return run_wait(cfg, ns.wait_timeout, command)
    if command:
        print(f"meshlib shim: unexpected arguments {command!r} (a command is run only with "
              "--wait)", file=sys.stderr)
        return 2
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError as exc:
        print(f"meshlib shim: {exc.name} is not installed: pip install 'meshlib[shim]'",
              file=sys.stderr)
        return 2
    from meshlib.shim.process import skip_unused_imports

    skip_unused_imports()
    from meshlib.shim.app import Shim

    ignore_proxy_environment()
    try:
        return Shim(cfg).run()
    except ConfigError as exc:
        print(f"meshlib shim: {exc}", file=sys.stderr)
        return 2
