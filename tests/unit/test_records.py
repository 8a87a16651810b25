"""Instance-record parsing: good records become Endpoints, bad ones a RecordError naming
key, field and value."""

from __future__ import annotations

import json
import logging

import pytest

from meshlib.config import MISSING, RecordError, parse_instance_record
from meshlib.core.endpoints import Endpoint

KEY = "/meshlib/v1/services/orders/instances/orders-1"


def parse(data: str | bytes) -> Endpoint:
    return parse_instance_record(KEY, data, service="orders", instance_id="orders-1")


def test_full_record_becomes_an_endpoint() -> None:
    ep = parse(json.dumps({
        "address": "10.0.0.7", "port": 8080, "protocol": "grpc", "zone": "eu-1a",
        "weight": 250, "labels": {"version": "v2"}, "metadata": {"build": {"sha": "abc"}},
    }).encode())
    assert ep == Endpoint(
        service="orders", instance_id="orders-1", address="10.0.0.7", port=8080,
        protocol="grpc", zone="eu-1a", weight=250, labels={"version": "v2"},
        metadata={"build": {"sha": "abc"}}, key=KEY,
    )
    with pytest.raises(TypeError):
        ep.labels["version"] = "v3"  # type: ignore[index]


def test_minimal_record_gets_defaults() -> None:
    ep = parse('{"address": "orders.internal", "port": 80}')
    assert (ep.protocol, ep.zone, ep.weight) == ("http", None, 100)
    assert dict(ep.labels) == {} and dict(ep.metadata) == {}
    assert ep.key == KEY and ep.service == "orders" and ep.instance_id == "orders-1"


def test_record_round_trips_through_endpoint_to_record() -> None:
    ep = parse('{"address": "::1", "port": 50051, "protocol": "grpc", "labels": {"a": "b"}}')
    assert parse(json.dumps(ep.to_record())) == ep


@pytest.mark.parametrize(
    ("address", "normalised"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("localhost", "localhost"),
        ("orders-1.orders.svc.cluster.local", "orders-1.orders.svc.cluster.local"),
        ("orders.example.", "orders.example"),
        ("my_service", "my_service"),
    ],
)
def test_addresses_accepted(address: str, normalised: str) -> None:
    assert parse(json.dumps({"address": address, "port": 1})).address == normalised


def test_unknown_top_level_fields_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="meshlib.config.records"):
        ep = parse('{"address": "10.0.0.1", "port": 1, "quic": {"sni": "x"}, "priority": 2}')
    assert ep.address == "10.0.0.1"
    assert "priority, quic" in caplog.text and KEY in caplog.text


def test_tls_field_advertises_mesh_mtls() -> None:
    assert parse('{"address": "h", "port": 1, "tls": true}').tls is True
    assert parse('{"address": "h", "port": 1}').tls is False
    with pytest.raises(RecordError, match="tls="):
        parse('{"address": "h", "port": 1, "tls": "yes"}')


def test_protocol_is_case_insensitive() -> None:
    assert parse('{"address": "h", "port": 1, "protocol": "GRPC"}').protocol == "grpc"


BAD = [
    ('{"port": 1}', "address", MISSING, "required"),
    ('{"address": "h"}', "port", MISSING, "required"),
    ('{"address": 10, "port": 1}', "address", 10, "must be a string"),
    ('{"address": "", "port": 1}', "address", "", "empty"),
    ('{"address": "0.0.0.0", "port": 1}', "address", "0.0.0.0", "unspecified"),
    ('{"address": "::", "port": 1}', "address", "::", "unspecified"),
    ('{"address": "bad host!", "port": 1}', "address", "bad host!", "not an IP address"),
    ('{"address": "-x.example", "port": 1}', "address", "-x.example", "not an IP address"),
    ('{"address": "999.1.1.1", "port": 1}', "address", "999.1.1.1", "IPv4"),
    ('{"address": "h", "port": "8080"}', "port", "8080", "integer, not a string"),
    ('{"address": "h", "port": 80.5}', "port", 80.5, "integer"),
    ('{"address": "h", "port": true}', "port", True, "integer"),
    ('{"address": "h", "port": 0}', "port", 0, ">= 1"),
    ('{"address": "h", "port": 65536}', "port", 65536, "<= 65535"),
    ('{"address": "h", "port": 1, "protocol": "h3"}', "protocol", "h3", "must be one of"),
    ('{"address": "h", "port": 1, "zone": 3}', "zone", 3, "string"),
    ('{"address": "h", "port": 1, "zone": ""}', "zone", "", "empty"),
    ('{"address": "h", "port": 1, "weight": 0}', "weight", 0, ">= 1"),
    ('{"address": "h", "port": 1, "weight": 10001}', "weight", 10001, "<= 10000"),
    ('{"address": "h", "port": 1, "labels": ["a"]}', "labels", ["a"], "mapping"),
    ('{"address": "h", "port": 1, "labels": {"v": 2}}', "labels.v", 2, "string"),
    ('{"address": "h", "port": 1, "metadata": "x"}', "metadata", "x", "mapping"),
]


@pytest.mark.parametrize(("doc", "field", "value", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_records_name_key_field_and_value(
    doc: str, field: str, value: object, reason: str
) -> None:
    with pytest.raises(RecordError) as info:
        parse(doc)
    err = info.value
    assert err.key == KEY
    matching = [e for e in err.errors if e.field == field]
    assert matching, err.errors
    assert matching[0].value == value and type(matching[0].value) is type(value)
    assert reason in matching[0].reason
    assert f"{KEY}: {field}=" in str(err)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("{not json", "malformed JSON"),
        ("", "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("null", "must be a JSON object"),
        (b"\xff{}", "not UTF-8"),
    ],
)
def test_malformed_records(data: str | bytes, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        parse(data)
    assert info.value.fields() == [""]
    assert reason in info.value.errors[0].reason
    assert str(info.value).startswith(f"{KEY}: <document>=")


def test_all_record_errors_are_reported() -> None:
    with pytest.raises(RecordError) as info:
        parse('{"address": "0.0.0.0", "port": 0, "weight": "heavy"}')
    assert info.value.fields() == ["address", "port", "weight"]
    assert len(str(info.value).splitlines()) == 3
    assert isinstance(info.value, ValueError)
