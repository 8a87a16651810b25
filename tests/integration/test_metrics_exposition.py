"""The /metrics exposition: standalone server, ASGI and WSGI apps, and `promtool check metrics`
on what meshlib exports after a mix of recorded calls.

promtool comes from Debian's ``prometheus`` package (the project setup installs it); this test
fails, it does not skip, when it is missing.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meshlib.core.outcome import Outcome
from meshlib.telemetry import semconv as sc
from meshlib.telemetry.exposition import (
    metrics_asgi_app,
    metrics_wsgi_app,
    start_metrics_server,
)
from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.recorders import (
    HttpClientRecorder,
    HttpServerRecorder,
    RpcClientRecorder,
    RpcServerRecorder,
)


@pytest.fixture
def reg() -> CollectorRegistry:
    reg = CollectorRegistry()
    m = MeshMetrics(reg)
    http = HttpClientRecorder.for_service("orders", metrics=m)
    http.request(b"GET", 200, "", 0.012)
    http.request("PROPFIND", None, "httpx.ConnectError", 0.2)
    http.attempt(1, Outcome.CONNECT_FAILURE, 0.001)
    http.retry(Outcome.CONNECT_FAILURE)
    http.attempt(2, Outcome.SUCCESS, 0.01)
    http.budget_exhausted()
    http.breaker_transition("10.0.0.1:80", "open")
    http.ejected("10.0.0.1:80", "consecutive_5xx")
    http.no_endpoints()
    http.concurrency_rejected()
    RpcClientRecorder.for_service("users", metrics=m).call("a.Users", "Get", 14, "", 0.5)
    HttpServerRecorder.get(metrics=m).request("GET", 200, "/x/{id}", "", 0.001, caller="web")
    RpcServerRecorder.get(metrics=m).call("a.Users", "Get", "OK", "", 0.001, caller="web")
    RpcServerRecorder.get(metrics=m).access_denied("evil")
    m.family(sc.ENDPOINTS).labels("orders").set(3)
    m.family(sc.POLICY_REJECTIONS).labels("orders").inc()
    return reg


def promtool_check(text: bytes) -> None:
    exe = shutil.which("promtool")
    assert exe is not None, (
        "promtool is not on PATH: install Debian's 'prometheus' package "
        "(apt-get install -y prometheus) to lint the metrics exposition"
    )
    proc = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True,
                          timeout=30)
    assert proc.returncode == 0, (
        f"promtool check metrics failed (exit {proc.returncode}):\n"
        f"{proc.stdout.decode()}{proc.stderr.decode()}"
    )


def test_standalone_server_output_passes_promtool(reg: CollectorRegistry) -> None:
    srv = start_metrics_server(0, registry=reg)
    try:
        assert srv.addr == "127.0.0.1" and srv.port > 0
        with urllib.request.urlopen(srv.url, timeout=5) as resp:
            body = resp.read()
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
    finally:
        srv.close()
    text = body.decode()
    for spec in sc.ALL_FAMILIES:
        assert f"# TYPE {spec.exposed_name} {spec.kind}" in text, spec.exposed_name
    assert ('http_client_request_duration_seconds_bucket{error_type="httpx.ConnectError",'
            'http_request_method="_OTHER",http_response_status_code="",le="0.25",'
            'server_address="orders"} 1.0') in text
    promtool_check(body)


def test_wsgi_app_serves_the_registry(reg: CollectorRegistry) -> None:
    app = metrics_wsgi_app(reg)
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "SERVER_NAME": "x", "SERVER_PORT": "1", "wsgi.input": io.BytesIO(),
               "wsgi.url_scheme": "http"}
    body = b"".join(app(environ, lambda s, h: status.append(s)))
    assert status == ["200 OK"]
    assert b"meshlib_client_retries_total" in body
    promtool_check(body)


def test_asgi_app_serves_the_registry(reg: CollectorRegistry) -> None:
    app = metrics_asgi_app(reg)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"",
             "headers": []}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert b"rpc_client_call_duration_seconds_bucket" in body
    promtool_check(body)
