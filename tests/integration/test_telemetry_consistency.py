"""One set of metrics everywhere: the same outcome gives the same series on every client path.

Real etcd (``mesh`` fixture), a real WSGI server (werkzeug) and a real grpcio server on
loopback. The same two outcomes, a success and a retried failure (HTTP 503 / gRPC
UNAVAILABLE: both are a gateway error to the call plan), go through the HTTP sync client, the
HTTP async client and the gRPC channel; the series are then read from
``prometheus_client.REGISTRY.collect()`` (the drivers record on the process registry) and must
agree:

* HTTP sync and async: the same families, label names AND label values (only
  ``server_address``, the destination, differs), the same counts;
* HTTP and gRPC: the documented client duration family of each protocol
  (``http_client_request_duration_seconds`` / ``rpc_client_call_duration_seconds`` with their
  semconv labels), and identical label names and values in the shared mesh families
  ``meshlib_client_attempt_duration_seconds`` and ``meshlib_client_retries_total``;
* every duration histogram has the OTel advisory bucket boundaries.

Cardinality: 10,000 distinct paths through ``mesh.async_http_client()`` to a real uvicorn
server behind ``MeshASGIMiddleware`` add one client series per family (no path label at all)
and one server series (the route template). The server middleware alone with 10,000 paths in
process is covered by test_server_middleware.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_servers import pb, pb_grpc
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.serving import WSGIRequestHandler, make_server

from meshlib.mesh import Mesh
from meshlib.telemetry import semconv as sc
from meshlib.testing.etcd import _pdeathsig_prefix

HTTP_CALL = sc.HTTP_CLIENT_DURATION.name
RPC_CALL = sc.RPC_CLIENT_DURATION.name
ATTEMPTS = sc.CLIENT_ATTEMPT_DURATION.name
RETRIES = sc.CLIENT_RETRIES.exposed_name
REFUSED = sc.CLIENT_RETRIES_REFUSED.exposed_name
SHARED = (ATTEMPTS, RETRIES, REFUSED)
#: Policy for every destination here: 2 attempts, fast backoff, no breaker / ejection (so the
#: failure outcome is the same on every path however many times it is repeated).
POLICY = {
    "retries": {"attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}},
    "circuit_breaker": {"enabled": False},
    "outlier_detection": {"enabled": False},
}

#: A raw path of the cardinality test (templates such as /items/{id} may be labels).
_RAW_PATH = re.compile(r"/items/\d")
Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


# --------------------------------------------------------------------------- helpers


def collect(service: str, registry: CollectorRegistry = REGISTRY) -> tuple[Series, dict[str, set[str]]]:
    """For one destination: ``{family: {labels without server_address: count}}`` (histograms:
    the ``_count`` sample; counters: the ``_total`` sample; zero-valued children skipped) and
    ``{histogram family: bucket boundaries}``."""
    out: Series = defaultdict(dict)
    buckets: dict[str, set[str]] = defaultdict(set)
    for fam in registry.collect():
        for s in fam.samples:
            if s.labels.get("server_address") != service:
                continue
            rest = tuple(sorted((k, v) for k, v in s.labels.items()
                                if k not in ("server_address", "le")))
            if s.name.endswith("_bucket"):
                buckets[fam.name].add(s.labels["le"])
            elif (s.name == fam.name + "_count" or s.name == fam.name + "_total") and s.value:
                out[fam.name if fam.type != "counter" else s.name][rest] = s.value
    return dict(out), dict(buckets)


def label_names(series: Series, family: str) -> set[frozenset[str]]:
    return {frozenset(k for k, _ in key) for key in series.get(family, {})}


def values(series: Series, family: str, label: str) -> set[str]:
    return {dict(key)[label] for key in series.get(family, {})}


class _Quiet(WSGIRequestHandler):
    def log(self, *args: Any) -> None:
        pass


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """/ok -> 200, /fail -> 503."""
    fail = environ["PATH_INFO"].startswith("/fail")
    start_response("503 Service Unavailable" if fail else "200 OK", [("Content-Length", "2")])
    return [b"{}"]


class Ledger(pb_grpc.TestServiceServicer):
    def UnaryCall(self, request: Any, context: Any) -> Any:
        if request.action == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "ledger is unavailable")
        return pb.SimpleResponse(server_id="ledger")


def set_policy(mesh: Mesh, service: str) -> None:
    mesh.client.put(mesh.layout.policy_key(service), json.dumps(POLICY).encode())
    until = time.monotonic() + 10
    while mesh.snapshot(service).policy_revision == 0:
        assert time.monotonic() < until, f"policy of {service!r} never reached the mesh"
        time.sleep(0.01)


@pytest.fixture
def destinations(mesh: Mesh) -> Iterator[dict[str, str]]:
    """Three destinations on real servers: ``sync`` and ``async`` (the same WSGI server,
    registered twice) and ``rpc`` (a grpcio server). Names are unique per test run, so the
    process-registry series of this test are its own."""
    tag = uuid.uuid4().hex[:8]
    names = {"sync": f"cons-sync-{tag}", "async": f"cons-async-{tag}", "rpc": f"cons-rpc-{tag}"}
    http = make_server("127.0.0.1", 0, wsgi_app, threaded=True, request_handler=_Quiet)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    rpc = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_TestServiceServicer_to_server(Ledger(), rpc)
    rpc_port = rpc.add_insecure_port("127.0.0.1:0")
    rpc.start()
    try:
        for name in names.values():
            set_policy(mesh, name)
        mesh.register(names["sync"], http.server_port)
        mesh.register(names["async"], http.server_port)
        mesh.register(names["rpc"], rpc_port, protocol="grpc")
        for name in names.values():
            mesh.wait_for(name)
        yield names
    finally:
        http.shutdown()
        http.server_close()
        rpc.stop(None)


# --------------------------------------------------------------------------- same outcome, same series


def test_same_outcome_gives_the_same_series_on_http_sync_async_and_grpc(
        mesh: Mesh, destinations: dict[str, str]) -> None:
    sync_svc, async_svc, rpc_svc = destinations["sync"], destinations["async"], destinations["rpc"]

    with mesh.http_client(timeout=5) as http:
        assert http.get(f"http://{sync_svc}/ok").status_code == 200
        assert http.get(f"http://{sync_svc}/fail").status_code == 503

    async def async_calls() -> None:
        async with mesh.async_http_client(timeout=5) as http:
            assert (await http.get(f"http://{async_svc}/ok")).status_code == 200
            assert (await http.get(f"http://{async_svc}/fail")).status_code == 503

    asyncio.run(async_calls())

    with mesh.grpc_channel(rpc_svc) as channel:
        stub = pb_grpc.TestServiceStub(channel)
        assert stub.UnaryCall(pb.SimpleRequest(), timeout=5).server_id == "ledger"
        with pytest.raises(grpc.RpcError) as err:
            stub.UnaryCall(pb.SimpleRequest(action="unavailable"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    sync, sync_buckets = collect(sync_svc)
    asyn, async_buckets = collect(async_svc)
    rpc, rpc_buckets = collect(rpc_svc)

    # HTTP sync and async: identical series (label names and values) and counts
    assert sync == asyn, f"sync:\n{sync}\nasync:\n{asyn}"
    assert set(sync) == {HTTP_CALL, *SHARED}, sorted(sync)
    assert sync[HTTP_CALL] == {
        (("error_type", ""), ("http_request_method", "GET"),
         ("http_response_status_code", "200")): 1.0,
        (("error_type", "503"), ("http_request_method", "GET"),
         ("http_response_status_code", "503")): 1.0,
    }

    # gRPC: its own documented call family, the same shared mesh families
    assert set(rpc) == {RPC_CALL, *SHARED}, sorted(rpc)
    assert label_names(sync, HTTP_CALL) == {
        frozenset(sc.HTTP_CLIENT_DURATION.labels) - {"server_address"}}
    assert label_names(rpc, RPC_CALL) == {
        frozenset(sc.RPC_CLIENT_DURATION.labels) - {"server_address"}}
    assert rpc[RPC_CALL] == {
        (("error_type", ""), ("rpc_method", "UnaryCall"), ("rpc_response_status_code", "OK"),
         ("rpc_service", "meshtest.TestService"), ("rpc_system", "grpc")): 1.0,
        (("error_type", "UNAVAILABLE"), ("rpc_method", "UnaryCall"),
         ("rpc_response_status_code", "UNAVAILABLE"), ("rpc_service", "meshtest.TestService"),
         ("rpc_system", "grpc")): 1.0,
    }
    for family in SHARED:
        # identical label names, and for the same outcome identical values and counts
        assert label_names(rpc, family) == label_names(sync, family), family
        assert rpc[family] == sync[family], f"{family}: rpc {rpc[family]} != http {sync[family]}"
    assert sync[ATTEMPTS] == {
        (("attempt", "1"), ("outcome", "success")): 1.0,
        (("attempt", "1"), ("outcome", "gateway_error")): 1.0,
        (("attempt", "2"), ("outcome", "gateway_error")): 1.0,
    }
    assert sync[RETRIES] == {(("reason", "gateway_error"),): 1.0}
    assert sync[REFUSED] == {(("reason", "attempts_exhausted"),): 1.0}

    # the same bucket boundaries everywhere: the semconv advisory buckets (+Inf)
    expected = {repr(float(b)) for b in sc.DURATION_BUCKETS} | {"+Inf"}
    for name, got in (("sync", sync_buckets), ("async", async_buckets), ("rpc", rpc_buckets)):
        for family, les in got.items():
            assert les == expected, f"{name} {family}: buckets {sorted(les)}"
        assert set(got) == ({HTTP_CALL, ATTEMPTS} if name != "rpc" else {RPC_CALL, ATTEMPTS})


# --------------------------------------------------------------------------- cardinality

#: The server of the cardinality test: uvicorn + Starlette behind MeshASGIMiddleware, with the
#: process registry mounted at /metrics. It runs in a child process so that the client and the
#: server each get a core (in one process under one GIL 10,000 requests take ~30 s, not ~6).
SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from meshlib.server import MeshASGIMiddleware
from meshlib.telemetry import metrics_asgi_app

async def item(request):
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/items/{id}", item), Mount("/metrics", metrics_asgi_app())])
uvicorn.run(MeshASGIMiddleware(app, None, service=sys.argv[2]), host="127.0.0.1",
            port=int(sys.argv[1]), log_level="warning", access_log=False, http="h11",
            lifespan="off")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """``{http_route: count}`` of the server's http_server_request_duration_seconds."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sc.HTTP_SERVER_DURATION.name + "_count":
                out[s.labels["http_route"]] = out.get(s.labels["http_route"], 0) + s.value
    return out


@pytest.fixture
def asgi_server() -> Iterator[tuple[str, int]]:
    service = f"card-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    proc = subprocess.Popen(_pdeathsig_prefix() + [sys.executable, "-c", SERVER, str(port),
                                                   service], start_new_session=True)
    try:
        until = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"the ASGI server exited with {proc.returncode}"
            try:
                _scrape(port)
                break
            except OSError:
                assert time.monotonic() < until, "the ASGI server did not start"
                time.sleep(0.05)
        yield service, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_10000_distinct_paths_keep_client_and_server_series_bounded(
        mesh: Mesh, asgi_server: tuple[str, int]) -> None:
    """10,000 distinct paths through the async mesh client to uvicorn + MeshASGIMiddleware."""
    service, port = asgi_server
    mesh.register(service, port)
    mesh.wait_for(service)
    samples_before = sum(len(f.samples) for f in REGISTRY.collect())

    async def drive() -> None:
        async with mesh.async_http_client(timeout=10) as http:
            async def worker(start: int) -> None:
                for i in range(start, 10_000, 16):
                    r = await http.get(f"http://{service}/items/{i}?q={i}")
                    assert r.status_code == 200, (i, r.status_code)

            await asyncio.gather(*(worker(k) for k in range(16)))

    asyncio.run(drive())

    client, _ = collect(service)
    assert client == {
        HTTP_CALL: {(("error_type", ""), ("http_request_method", "GET"),
                     ("http_response_status_code", "200")): 10_000.0},
        ATTEMPTS: {(("attempt", "1"), ("outcome", "success")): 10_000.0},
    }
    # no label anywhere carries a path, and the registry grew by a bounded number of samples
    for fam in REGISTRY.collect():
        for s in fam.samples:
            assert not any(_RAW_PATH.search(v) for v in s.labels.values()), s
    samples_after = sum(len(f.samples) for f in REGISTRY.collect())
    assert samples_after - samples_before < 200, (samples_before, samples_after)

    # server side: one series for the route template (and the scrapes' own /metrics mount)
    routes = _scrape(port)
    assert routes.pop("/items/{id}") == 10_000.0
    assert set(routes) <= {"/metrics"}, routes
