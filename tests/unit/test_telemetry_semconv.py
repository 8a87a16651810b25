"""Names, labels, buckets and value normalisation of meshlib's telemetry (semconv.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meshlib.telemetry import semconv as sc
from meshlib.telemetry.metrics import MeshMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"

OTEL_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


@pytest.mark.parametrize("method", sorted(sc.KNOWN_HTTP_METHODS))
def test_known_methods_keep_their_name_as_str_and_bytes(method: str) -> None:
    assert sc.http_method_label(method) == method
    assert sc.http_method_label(method.encode()) == method


@pytest.mark.parametrize("method", ["get", "PROPFIND", "", b"FOO", "QUERY ", "G\u00c9T"])
def test_unknown_methods_become_other(method: str | bytes) -> None:
    assert sc.http_method_label(method) == "_OTHER"


@pytest.mark.parametrize(
    ("status", "label"),
    [(200, "200"), (100, "100"), (599, "599"), (None, ""), (600, "_OTHER"), (99, "_OTHER"),
     (-1, "_OTHER")],
)
def test_http_status_labels(status: int | None, label: str) -> None:
    assert sc.http_status_label(status) == label


class _Code:  # stands for grpc.StatusCode members (enum with .name)
    name = "UNAVAILABLE"


@pytest.mark.parametrize(
    ("code", "label"),
    [("OK", "OK"), (_Code(), "UNAVAILABLE"), (14, "UNAVAILABLE"), (0, "OK"),
     ("deadline-exceeded", "DEADLINE_EXCEEDED"), (None, ""), ("bogus", "_OTHER"), (99, "_OTHER")],
)
def test_grpc_status_labels(code: object, label: str) -> None:
    assert sc.grpc_status_label(code) == label


@pytest.mark.parametrize(("n", "label"), [(0, "1"), (1, "1"), (2, "2"), (3, "3+"), (17, "3+")])
def test_attempt_labels_are_bounded(n: int, label: str) -> None:
    assert sc.attempt_label(n) == label


def test_duration_histograms_use_the_otel_http_buckets() -> None:
    names = {f.name for f in sc.ALL_FAMILIES if f.kind == "histogram"}
    assert names == {
        "http_client_request_duration_seconds", "http_server_request_duration_seconds",
        "rpc_client_call_duration_seconds", "rpc_server_call_duration_seconds",
        "meshlib_client_attempt_duration_seconds",
        "meshlib_snapshot_file_write_duration_seconds",
    }
    for f in sc.ALL_FAMILIES:
        if f.kind == "histogram":
            assert f.buckets == OTEL_HTTP_BUCKETS, f.name
            assert f.name.endswith("_seconds"), f.name


def test_semconv_families_have_the_documented_label_names() -> None:
    assert sc.HTTP_CLIENT_DURATION.labels == (
        "http_request_method", "http_response_status_code", "server_address", "error_type")
    assert sc.HTTP_SERVER_DURATION.labels == (
        "http_request_method", "http_response_status_code", "http_route", "error_type",
        "meshlib_caller")
    assert sc.RPC_CLIENT_DURATION.labels == (
        "rpc_system", "rpc_service", "rpc_method", "rpc_response_status_code",
        "server_address", "error_type")
    assert sc.RPC_SERVER_DURATION.labels == (
        "rpc_system", "rpc_service", "rpc_method", "rpc_response_status_code", "error_type",
        "meshlib_caller")


def test_every_registered_family_matches_its_spec() -> None:
    reg = CollectorRegistry()
    MeshMetrics(reg)
    exposed = {m.name: m for m in reg.collect()}
    for spec in sc.ALL_FAMILIES:
        # prometheus_client reports counters without _total in collect()
        fam = exposed[spec.name]
        assert fam.type == spec.kind, spec.name
        assert fam.documentation == spec.help
    names = [f.name for f in sc.ALL_FAMILIES]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", n) for n in names)
    assert all(not n.endswith("_total") for n in names)  # prometheus_client adds it


def test_docs_list_every_series_with_its_labels() -> None:
    text = DOC.read_text()
    for spec in sc.ALL_FAMILIES:
        row = next((ln for ln in text.splitlines()
                    if ln.startswith(f"| `{spec.exposed_name}` |")), None)
        assert row is not None, f"docs/metrics.md does not list {spec.exposed_name}"
        for label in spec.labels:
            assert f"`{label}`" in row, f"docs/metrics.md row of {spec.exposed_name}: no {label}"
        assert spec.kind in row, f"docs/metrics.md row of {spec.exposed_name}: no type"
    assert sc.SEMCONV_VERSION in text
