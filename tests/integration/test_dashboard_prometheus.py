"""The Grafana dashboard against a REAL Prometheus scraping a real mesh.

``adapters/grafana/meshlib-dashboard.json`` is only useful if every query in it returns data
from what meshlib exports. This test:

1. checks statically that the dashboard names only series and labels of
   ``meshlib.telemetry.semconv`` (the names docs/metrics.md lists) and uses every family;
2. runs a scripted scenario in this process (real etcd, real WSGI servers behind
   ``MeshWSGIMiddleware``, a real grpcio server behind ``MeshServerInterceptor``, clients through
   ``mesh.http_client()`` and ``mesh.grpc_channel()``) producing every series: successes,
   4xx/5xx, connect-failure retries, a retry budget exhaustion, a breaker opening, an ejection
   and a skipped one, a concurrency rejection, a call with no endpoints, a refused policy, a
   malformed instance record, server-side HTTP and RPC requests and an access denial;
3. serves the process registry with ``start_metrics_server`` and starts Debian's
   ``/usr/bin/prometheus`` (scrape interval 1 s, storage in a temp dir, a free loopback port);
4. resolves the template variables the way Grafana does (``label_values`` through
   ``/api/v1/label/<name>/values``), substitutes them (a multi-value selection of the
   scenario's services, then "All"), runs EVERY query of every panel through
   ``/api/v1/query`` and asserts each returns a non-empty result; the scenario's events must
   also be visible in Prometheus with positive values;
5. lints the live exposition with ``promtool check metrics``.

Prometheus is killed at teardown. The whole test takes ~10 s (bounded at 60 s).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_servers import pb, pb_grpc
from werkzeug.serving import WSGIRequestHandler, make_server

from meshlib.http.errors import CircuitOpenError
from meshlib.mesh import Mesh
from meshlib.server import MeshServerInterceptor, MeshWSGIMiddleware
from meshlib.telemetry import semconv as sc
from meshlib.telemetry import start_metrics_server
from meshlib.testing.etcd import _pdeathsig_prefix

DASHBOARD = Path(__file__).resolve().parents[2] / "adapters" / "grafana" / "meshlib-dashboard.json"
PROMETHEUS = "/usr/bin/prometheus"
JOB = "meshlib-dash"
SHOP, FLAKY, SLOW, EMPTY, LEDGER = "dash-shop", "dash-flaky", "dash-slow", "dash-empty", "dash-ledger"
HTTP_SERVICES = (SHOP, FLAKY, SLOW, EMPTY)
RATE_INTERVAL = "1m"
#: Labels Prometheus or PromQL add: target labels and the histogram bucket bound.
EXTRA_LABELS = {"job", "instance", "le"}


# --------------------------------------------------------------------------- dashboard parsing


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every target of every panel (rows included)."""
    out = []
    stack = list(dash["panels"])
    while stack:
        p = stack.pop(0)
        stack.extend(p.get("panels", []))
        for t in p.get("targets", []):
            out.append((f"{p['title']} / {t['refId']}", t["expr"]))
    return out


def variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash["templating"]["list"]}


_FAMILY_BY_SERIES: dict[str, sc.Family] = {}
for _f in sc.ALL_FAMILIES:
    _FAMILY_BY_SERIES[_f.exposed_name] = _f
    if _f.kind == "histogram":
        for _suffix in ("_bucket", "_count", "_sum"):
            _FAMILY_BY_SERIES[_f.name + _suffix] = _f

_SERIES_RE = re.compile(r"\b([a-z_][a-z0-9_]*)\{")
_TOKEN_RE = re.compile(r"(?<![$\w])((?:meshlib|http|rpc)_[a-z0-9_]+)\b")
_LABELS = {label for f in sc.ALL_FAMILIES for label in f.labels}
_SELECTOR_RE = re.compile(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}")
_BY_RE = re.compile(r"\bby \(([^)]*)\)")
_MATCHER_RE = re.compile(r"([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)")


def test_dashboard_uses_only_documented_series_and_labels() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36, "Grafana 10+ schema expected"
    vars_ = variables(dash)
    assert vars_["datasource"]["type"] == "datasource"
    assert vars_["datasource"]["query"] == "prometheus"
    assert vars_["service"]["definition"] == (
        "label_values(http_client_request_duration_seconds_count, server_address)")
    assert vars_["rpc_destination"]["definition"] == (
        "label_values(rpc_client_call_duration_seconds_count, server_address)")
    used: set[str] = set()
    problems = []
    for where, expr in queries(dash):
        names = set(_SERIES_RE.findall(expr))
        stray = set(_TOKEN_RE.findall(expr)) - names - _LABELS
        unknown = (names | stray) - set(_FAMILY_BY_SERIES)
        if unknown:
            problems.append(f"{where}: unknown series {sorted(unknown)}")
            continue
        fams = {_FAMILY_BY_SERIES[n] for n in names}
        used.update(f.name for f in fams)
        allowed = set().union(*(f.labels for f in fams)) | EXTRA_LABELS
        for series, matchers in _SELECTOR_RE.findall(expr):
            own = set(_FAMILY_BY_SERIES[series].labels) | {"job", "instance"}
            for label in _MATCHER_RE.findall(matchers):
                if label not in own:
                    problems.append(f"{where}: {series} has no label {label!r}")
        for group in _BY_RE.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                if label not in allowed:
                    problems.append(f"{where}: grouping by unknown label {label!r}")
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    assert not problems, "\n".join(problems)
    missing = {f.name for f in sc.ALL_FAMILIES} - used
    assert not missing, f"families with no panel: {sorted(missing)}"


# --------------------------------------------------------------------------- the scenario


class _Quiet(WSGIRequestHandler):
    def log(self, *args: Any) -> None:
        pass


def _app(mode: str) -> Callable[..., Any]:
    """A tiny WSGI service: /items/{id} (200, or 503 in mode "503"), /missing (404),
    /slow (200 after 0.3 s). It names its route template for the server metrics."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path.startswith("/slow"):
            environ["meshlib.route"] = "/slow"
            time.sleep(0.3)
        elif path.startswith("/items/"):
            environ["meshlib.route"] = "/items/{id}"
        status = "503 Service Unavailable" if mode == "503" else (
            "404 Not Found" if path.startswith("/missing") else "200 OK")
        start_response(status, [("Content-Length", "2")])
        return [b"{}"]

    return app


class _Ledger(pb_grpc.TestServiceServicer):
    def UnaryCall(self, request: Any, context: Any) -> Any:
        if request.action == "status":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such entry")
        if request.action == "boom":
            raise RuntimeError("ledger bug")  # UNKNOWN: a server-side error
        return pb.SimpleResponse(server_id="ledger")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scenario:
    """Every meshlib series, produced by real servers and clients in this process."""

    def __init__(self, etcd: str, prefix: str) -> None:
        self.srv = Mesh(etcd, prefix=prefix, handle_sigterm=False)
        self.cli = Mesh(etcd, prefix=prefix, service="checkout", handle_sigterm=False)
        self.http_servers: list[Any] = []
        self.grpc_server: Any = None
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.calls = 0
        self.identity_parts: list[Any] = []

    def _put_policy(self, service: str, policy: dict[str, Any] | bytes) -> None:
        value = policy if isinstance(policy, bytes) else json.dumps(policy).encode()
        self.srv.client.put(self.srv.layout.policy_key(service), value)

    def _serve(self, service: str, mode: str, iid: str) -> None:
        app = MeshWSGIMiddleware(_app(mode), self.srv, service=service)
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.http_servers.append(server)
        self.srv.register(service, server.server_port, instance_id=iid)

    def start(self) -> None:
        fast = {"base": "1ms", "max": "2ms"}
        self._put_policy(SHOP, {"circuit_breaker": {"failure_threshold": 2},
                                "retries": {"attempts": 3, "backoff": fast}})
        self._put_policy(FLAKY, {
            "retries": {"attempts": 2, "budget": {"percent": 0, "min_retries_per_second": 0}},
            "outlier_detection": {"consecutive_gateway_failure": 1, "max_ejection_percent": 50},
        })
        self._put_policy(SLOW, {"concurrency": {"max_requests": 1}})
        self._put_policy(LEDGER, {"access": {"allow": ["checkout"]}})
        self._put_policy(EMPTY, b"retries: {attempts: 9}\n")  # refused: attempts <= 5
        self.srv.client.put(self.srv.layout.instance_key(EMPTY, "garbage"), b"not json")
        self._serve(SHOP, "ok", "shop-a")
        self._serve(SHOP, "ok", "shop-b")
        self.srv.register(SHOP, _free_port(), instance_id="shop-dead")  # nothing listens
        self._serve(FLAKY, "503", "flaky-a")
        self._serve(FLAKY, "503", "flaky-b")
        self._serve(SLOW, "ok", "slow-a")
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[
            MeshServerInterceptor(self.srv, service=LEDGER)])
        pb_grpc.add_TestServiceServicer_to_server(_Ledger(), self.grpc_server)
        gport = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.grpc_server.start()
        self.srv.register(LEDGER, gport, protocol="grpc", instance_id="ledger-a")
        for service, n in ((SHOP, 3), (FLAKY, 2), (SLOW, 1), (LEDGER, 1)):
            self.cli.wait_for(service, n)
        until = time.monotonic() + 10
        while any(self.cli.snapshot(s).policy_revision == 0 for s in (SHOP, FLAKY, SLOW, LEDGER)):
            assert time.monotonic() < until, "the scenario's policies never reached the mesh"
            time.sleep(0.01)
        self._one_shot_events(gport)
        self._identity()
        t = threading.Thread(target=self._traffic, daemon=True)
        t.start()
        self.threads.append(t)

    def _one_shot_events(self, gport: int) -> None:
        with self.cli.http_client(timeout=5) as http:
            with pytest.raises(httpx.HTTPError):  # no endpoints
                http.get(f"http://{EMPTY}/items/1")
            outcome: list[Any] = []

            def slow() -> None:
                try:
                    outcome.append(http.get(f"http://{SLOW}/slow").status_code)
                except httpx.HTTPError as exc:
                    outcome.append(type(exc).__name__)

            pair = [threading.Thread(target=slow) for _ in range(2)]
            for t in pair:
                t.start()
            for t in pair:
                t.join(10)
            assert sorted(map(str, outcome)) == ["200", "ConcurrencyLimitError"], outcome
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as raw:  # no caller: denied
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.TestServiceStub(raw).UnaryCall(pb.SimpleRequest())
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    def _identity(self) -> None:
        """A signer and a process with an identity: certificate expiry, requests, signer."""
        from meshlib.identity.etcd_source import EtcdIdentitySource
        from meshlib.identity.signer import Signer
        from meshlib.identity.testing import TestCA

        signer = Signer(self.srv.client, TestCA().authority, prefix=self.srv.layout.prefix)
        self.identity_parts.append(signer)
        source = EtcdIdentitySource(self.cli.client, "checkout", prefix=self.cli.layout.prefix)
        self.identity_parts.append(source)
        assert source.wait_ready(10), source.last_error

    def _traffic(self) -> None:
        """Steady traffic while Prometheus scrapes: 200s, 404s, 503s, RPCs OK, NOT_FOUND and
        (every tenth round) UNKNOWN from a handler exception."""
        try:
            channel = self.cli.grpc_channel(LEDGER)
            stub = pb_grpc.TestServiceStub(channel)
            with self.cli.http_client(timeout=5) as http, channel:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    got = (http.get(f"http://{SHOP}/items/{i}").status_code,
                           http.get(f"http://{SHOP}/missing/{i}").status_code)
                    assert got == (200, 404), got
                    try:  # 503 until flaky-b's breaker opens too (flaky-a is ejected)
                        assert http.get(f"http://{FLAKY}/items/{i}").status_code == 503
                    except CircuitOpenError:
                        pass
                    stub.UnaryCall(pb.SimpleRequest())
                    try:
                        stub.UnaryCall(pb.SimpleRequest(action="status"))
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                    if i % 10 == 1:
                        try:
                            stub.UnaryCall(pb.SimpleRequest(action="boom"))
                        except grpc.RpcError as exc:
                            assert exc.code() == grpc.StatusCode.UNKNOWN, exc
                    self.calls += 1
                    self.stop.wait(0.05)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        for server in self.http_servers:
            server.shutdown()
            server.server_close()
        if self.grpc_server is not None:
            self.grpc_server.stop(None)
        for part in reversed(self.identity_parts):
            part.close()
        self.cli.close()
        self.srv.close()


# --------------------------------------------------------------------------- Prometheus


class Prometheus:
    """Debian's prometheus binary on a free loopback port, scraping ``targets`` every 1 s."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        self.port = _free_port()
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }))
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(  # killed with this process even on SIGKILL (Linux)
            _pdeathsig_prefix() + [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.logfile = tmp / "prometheus.log"
        until = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, (
                f"prometheus exited with {self.proc.returncode}:\n{self.logfile.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < until, f"prometheus not ready:\n{self.logfile.read_text()}"
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **params: str) -> Any:
        qs = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{qs}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # Prometheus explains a bad query in the body
            raise AssertionError(f"prometheus {path} {params}: HTTP {exc.code}: "
                                 f"{exc.read().decode(errors='replace')}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        return data["result"]  # type: ignore[no-any-return]

    def label_values(self, definition: str) -> list[str]:
        """Grafana's ``label_values(metric, label)`` through the labels API."""
        m = re.fullmatch(r"label_values\(\s*([a-z_0-9]+)\s*,\s*([a-z_0-9]+)\s*\)", definition)
        assert m, f"unsupported variable query {definition!r}"
        return self.get(f"/api/v1/label/{m.group(2)}/values",  # type: ignore[no-any-return]
                        **{"match[]": m.group(1)})

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


_VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"dashboard variable ${name} has no value in the test"
        return values[name]

    return _VAR_RE.sub(repl, expr)


def multi(values: tuple[str, ...]) -> str:
    """Grafana's rendering of a multi-value selection in a Prometheus query: ``(a|b)``, regex
    metacharacters escaped with a backslash that is itself escaped for the PromQL string."""
    return "(" + "|".join(re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\\\1", v)
                          for v in values) + ")"


@pytest.fixture
def scenario(etcd_server: Any, etcd_prefix: str) -> Iterator[Scenario]:
    s = Scenario(etcd_server.endpoint, etcd_prefix)
    try:
        s.start()
        yield s
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
        scenario: Scenario, tmp_path: Path) -> None:
    assert shutil.which(PROMETHEUS) or Path(PROMETHEUS).exists(), (
        f"{PROMETHEUS} missing: install Debian's 'prometheus' package (make system-deps)")
    metrics = start_metrics_server(0)
    prom = None
    try:
        prom = Prometheus(tmp_path, [f"127.0.0.1:{metrics.port}"])
        dash = dashboard()
        vars_ = variables(dash)
        selected = {"service": HTTP_SERVICES, "rpc_destination": (LEDGER,), "job": (JOB,)}
        # events of the scenario that must be in Prometheus with a positive value
        events = {
            "budget exhausted": f'meshlib_client_retry_budget_exhausted_total{{server_address="{FLAKY}"}}',
            "breaker opened": f'meshlib_client_breaker_transitions_total{{server_address="{SHOP}", state="open"}}',
            "ejection": f'meshlib_client_ejections_total{{server_address="{FLAKY}"}}',
            "ejection skipped": f'meshlib_client_ejections_skipped_total{{server_address="{FLAKY}"}}',
            "retry": f'meshlib_client_retries_total{{server_address="{SHOP}", reason="connect_failure"}}',
            "no endpoints": f'meshlib_client_no_endpoints_total{{server_address="{EMPTY}"}}',
            "concurrency": f'meshlib_client_concurrency_rejections_total{{server_address="{SLOW}"}}',
            "policy refused": f'meshlib_policy_rejections_total{{service="{EMPTY}"}}',
            "record refused": f'meshlib_instance_record_rejections_total{{service="{EMPTY}"}}',
            "access denied": 'meshlib_server_access_denials_total{meshlib_caller=""}',
            "http server": 'http_server_request_duration_seconds_count{meshlib_caller="checkout"}',
            "rpc server": 'rpc_server_call_duration_seconds_count{rpc_response_status_code="OK"}',
            "rpc server error": 'rpc_server_call_duration_seconds_count{rpc_response_status_code='
                                '"UNKNOWN", error_type="RuntimeError"}',
            "http server error": 'http_server_request_duration_seconds_count{error_type="503"}',
            "rpc client error": f'rpc_client_call_duration_seconds_count{{server_address="{LEDGER}", '
                                f'rpc_response_status_code="NOT_FOUND"}}',
            "etcd connected": "meshlib_etcd_connected",
            "certificate": 'meshlib_identity_cert_expiry_seconds{service="checkout"}',
            "signed": 'meshlib_signer_requests_total{service="checkout", result="issued"}',
            "signer active": "meshlib_signer_active",
        }
        exprs = queries(dash)
        assert len(exprs) >= 30
        until = time.monotonic() + 40
        while True:
            failures: list[str] = []
            for name, var in vars_.items():
                if name == "datasource":
                    continue
                got = prom.label_values(var["definition"])
                missing = set(selected[name]) - set(got)
                if missing:
                    failures.append(f"variable ${name}: {sorted(missing)} not in {got}")
            for label, values in (("selection", {k: multi(v) for k, v in selected.items()}),
                                  ("All", {k: ".*" for k in selected})):
                values["__rate_interval"] = RATE_INTERVAL
                for where, expr in exprs:
                    if not prom.query(substitute(expr, values)):
                        failures.append(f"[{label}] {where}: empty result for\n    "
                                        f"{substitute(expr, values)}")
            for what, expr in events.items():
                result = prom.query(expr)
                if not any(float(r["value"][1]) > 0 for r in result):
                    failures.append(f"event {what}: {expr} -> {result}")
            if not failures:
                break
            if time.monotonic() > until:
                pytest.fail(f"{len(failures)} dashboard queries without data:\n"
                            + "\n".join(failures))
            time.sleep(1)

        assert not scenario.errors, scenario.errors
        assert scenario.calls > 0

        # the live exposition of this scenario passes promtool's lint as well
        with urllib.request.urlopen(metrics.url, timeout=5) as r:
            exposition = r.read()
        promtool = shutil.which("promtool") or "/usr/bin/promtool"
        proc = subprocess.run([promtool, "check", "metrics"], input=exposition,
                              capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    finally:
        if prom is not None:
            prom.close()
        metrics.close()
