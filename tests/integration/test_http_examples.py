"""The examples as real processes: two Flask ``orders`` instances and the FastAPI gateway.

Starts ``examples/flask_orders.py`` (twice) and ``examples/fastapi_gateway.py`` as
subprocesses against the session etcd (a key prefix of their own), then calls the gateway
with plain httpx: the gateway reaches ``orders`` through ``mesh.async_http_client()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from meshlib.mesh import Mesh
from meshlib.testing.etcd import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _spawn(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait(pred, timeout: float, what: str, procs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except httpx.HTTPError:
            pass
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args} exited {p.returncode}: "
                                     f"{p.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def procs():
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
        if p.stderr:
            p.stderr.close()


def test_gateway_calls_flask_orders_through_the_mesh(etcd_server, etcd_prefix, procs):
    etcd = etcd_server.endpoint
    common = ("--etcd", etcd, "--prefix", etcd_prefix)
    pa, pb, pg = free_port(), free_port(), free_port()
    a = _spawn("flask_orders.py", *common, "--port", str(pa), "--id", "orders-a")
    b = _spawn("flask_orders.py", *common, "--port", str(pb), "--id", "orders-b",
               "--version", "v2")
    gw = _spawn("fastapi_gateway.py", *common, "--port", str(pg))
    procs.extend([a, b, gw])
    base = f"http://127.0.0.1:{pg}"
    with httpx.Client(base_url=base, timeout=10, trust_env=False) as http, \
            Mesh(etcd, prefix=etcd_prefix, handle_sigterm=False) as observer:
        _wait(lambda: http.get("/healthz").json()["orders_endpoints"] == 2, 30,
              "the gateway to see both orders instances", procs)
        assert observer.wait_for("gateway", timeout=10).endpoints[0].port == pg

        answers = [http.get(f"/api/orders/{i}") for i in range(20)]
        assert [r.status_code for r in answers] == [200] * 20
        orders = [r.json()["order"] for r in answers]
        assert {o["served_by"] for o in orders} == {"orders-a", "orders-b"}
        assert {o["version"] for o in orders} == {"v1", "v2"}
        assert {o["caller"] for o in orders} == {"gateway"}
        assert all(0 < o["deadline_s"] <= 15 for o in orders)  # default policy timeout

        # the deadline the gateway received is passed on, minus what it used
        r = http.get("/api/orders/7", headers={"x-mesh-timeout": "2S"})
        assert 0 < r.json()["order"]["deadline_s"] <= 2

        r = http.post("/api/orders", json={"item": "book"}, headers={"Idempotency-Key": "k1"})
        assert r.status_code == 201 and r.json()["order"]["idempotency_key"] == "k1"

        # SIGKILL one instance: its record stays in etcd until its lease expires, and the
        # mesh's retries (connect failure -> another instance) hide it from the gateway's users
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(5)
        answers = [http.get(f"/api/orders/{i}") for i in range(20)]
        assert [r.status_code for r in answers] == [200] * 20
        assert {r.json()["order"]["served_by"] for r in answers} == {"orders-b"}

        # SIGTERM the other: it deregisters; the gateway then reports the mesh's error
        b.terminate()
        assert b.wait(10) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
        observer.client.delete(observer.layout.instance_key("orders", "orders-a"))
        _wait(lambda: http.get("/healthz").json()["orders_endpoints"] == 0, 10,
              "orders to have no endpoints", procs[2:])
        r = http.get("/api/orders/1")
        assert r.status_code == 503
        assert r.json()["error"] == "no_endpoints" and "'orders'" in r.json()["detail"]

        gw.terminate()  # uvicorn shuts down gracefully (lifespan deregisters), re-raises
        assert gw.wait(10) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 3
        while observer.snapshot("gateway").endpoints and time.monotonic() < deadline:  # < TTL
            time.sleep(0.05)
        assert observer.snapshot("gateway").endpoints == ()
