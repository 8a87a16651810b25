"""Policy schema: durations, defaults, round trips, every kind of refusal, merge semantics."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import yaml

from meshlib.config import (
    DEFAULT_POLICY,
    MISSING,
    DurationError,
    FieldError,
    Policy,
    PolicyError,
    format_duration,
    load_policy_document,
    merge_policy_dicts,
    parse_duration,
    parse_policy,
    parse_policy_dict,
)

KEY = "/meshlib/v1/services/orders/policy"

# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("100us", 0.0001),
        ("100µs", 0.0001),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h2m3s4ms", 3723.004),
        (".5s", 0.5),
        ("10ns", 1e-08),
        (" 3s ", 3.0),
        ("0", 0.0),
        ("0s", 0.0),
        (2, 2.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-1s", "negative"),
        (-2, "negative"),
        ("5d", "unknown unit 'd'"),
        ("5 s", "unknown unit ' s'"),
        ("250", "no unit"),
        ("1.5", "no unit"),
        ("fast", "expected a number"),
        ("1s2", "has no unit"),
        ("s", "expected a number"),
        (True, "boolean"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ([1], "got list"),
    ],
)
def test_parse_duration_rejects_with_clear_message(value: object, message: str) -> None:
    with pytest.raises(DurationError, match=message.replace("(", r"\(")) as info:
        parse_duration(value)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (1.5, "1500ms"),
        (2.0, "2s"),
        (90.0, "90s"),
        (300.0, "5m"),
        (3600.0, "1h"),
        (0.0001, "100us"),
        (1e-08, "10ns"),
    ],
)
def test_format_duration_is_exact_and_parses_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_below_a_nanosecond_still_round_trips() -> None:
    assert parse_duration(format_duration(1.5e-10)) == 1.5e-10


# --------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("doc", ["", "   \n", "---\n", "{}", b"", b"{}", "# only a comment\n"])
def test_empty_document_is_the_default_policy(doc: str | bytes) -> None:
    assert parse_policy(doc, KEY) == DEFAULT_POLICY == Policy()


def test_defaults_follow_the_documented_anchors() -> None:
    p = DEFAULT_POLICY
    assert p.timeout == 15.0
    r = p.retries
    assert r.attempts == 3 and r.per_try_timeout is None
    assert r.retry_on == ("connect-failure", "refused-stream", "reset", "gateway-error")
    assert r.grpc_retry_on == ("unavailable",)
    assert r.methods == ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
    assert r.allow_post_with_idempotency_key is False
    assert (r.backoff.base, r.backoff.max) == (0.025, 0.25)
    assert (r.budget.percent, r.budget.min_retries_per_second, r.budget.window) == (20, 10, 10.0)
    assert (r.hedging.enabled, r.hedging.delay, r.hedging.max_extra) == (False, 0.05, 1)
    lb = p.load_balancer
    assert (lb.policy, lb.hash_on, lb.ring_size, lb.zone_aware) == (
        "least_request", None, 1024, True)
    assert lb.min_zone_healthy_percent == 50
    assert (lb.ewma.default_rtt, lb.ewma.decay) == (0.03, 10.0)
    cb = p.circuit_breaker
    assert (cb.enabled, cb.failure_threshold, cb.reset_timeout, cb.half_open_max_calls) == (
        True, 5, 10.0, 1)
    od = p.outlier_detection
    assert (od.consecutive_5xx, od.consecutive_gateway_failure, od.interval) == (5, 5, 10.0)
    assert (od.base_ejection_time, od.max_ejection_time, od.max_ejection_percent) == (
        30.0, 300.0, 10)
    assert p.concurrency.max_requests == 1024
    assert dict(p.subsets) == {} and p.routes == ()
    assert (p.fault.delay.percent, p.fault.abort.percent) == (0.0, 0.0)
    assert (p.fault.abort.http_status, p.fault.abort.grpc_status) == (503, "unavailable")
    assert p.fault.abort.grpc_code == 14
    assert p.access.allow == ("*",) and p.access.allows("anyone")
    hc = p.health_check
    assert (hc.enabled, hc.interval, hc.timeout, hc.unhealthy_threshold) == (False, 5.0, 1.0, 2)


def test_policy_is_immutable() -> None:
    p = parse_policy("subsets: {v1: {labels: {version: v1}}}", KEY)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        p.timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.subsets["v2"] = p.subsets["v1"]  # type: ignore[index]
    with pytest.raises(TypeError):
        p.subsets["v1"].labels["version"] = "v9"  # type: ignore[index]
    assert isinstance(p.retries.methods, tuple)


# --------------------------------------------------------------------------- full example

FULL = """
timeout: 2s
retries:
  attempts: 4
  per_try_timeout: 500ms
  retry_on: [connect-failure, 5xx, retriable-status-codes]
  retriable_status_codes: [409, 429]
  grpc_retry_on: [UNAVAILABLE, resource_exhausted]
  methods: [get, put]
  allow_post_with_idempotency_key: true
  backoff: {base: 10ms, max: 1s}
  budget: {percent: 50, min_retries_per_second: 5, window: 30s}
  hedging: {enabled: true, delay: 20ms, max_extra: 2}
load_balancer:
  policy: ring_hash
  hash_on: {header: X-User-Id}
  ring_size: 4096
  zone_aware: false
  min_zone_healthy_percent: 70
  ewma: {default_rtt: 10ms, decay: 5s}
circuit_breaker: {enabled: false, failure_threshold: 3, reset_timeout: 1m, half_open_max_calls: 2}
outlier_detection:
  enabled: true
  consecutive_5xx: 3
  consecutive_gateway_failure: 2
  interval: 5s
  base_ejection_time: 15s
  max_ejection_time: 2m
  max_ejection_percent: 50
concurrency: {max_requests: 100}
subsets:
  v1: {labels: {version: v1}}
  v2: {labels: {version: v2, track: canary}}
routes:
  - name: canary-header
    match: {headers: {X-Canary: "true"}, path_prefix: /api}
    split: [{subset: v2, weight: 100}]
  - split: [{subset: v1, weight: 90}, {subset: v2, weight: 10}, {weight: 0}]
fault:
  delay: {percent: 12.5, duration: 100ms}
  abort: {percent: 1, http_status: 500, grpc_status: DEADLINE_EXCEEDED}
access:
  allow: [frontend, billing, frontend]
health_check: {enabled: true, interval: 2s, timeout: 500ms, unhealthy_threshold: 3}
"""


def test_full_example_parses_normalises_and_round_trips() -> None:
    p = parse_policy(FULL, KEY)
    assert p.timeout == 2.0
    assert p.retries.per_try_timeout == 0.5
    assert p.retries.grpc_retry_on == ("unavailable", "resource-exhausted")
    assert p.retries.methods == ("GET", "PUT")
    assert p.load_balancer.hash_on is not None
    assert p.load_balancer.hash_on.header == "x-user-id"
    assert dict(p.routes[0].match.headers) == {"x-canary": "true"}
    assert p.routes[1].split[2].subset is None
    assert p.fault.abort.grpc_status == "deadline-exceeded"
    assert p.fault.abort.grpc_code == 4
    assert p.access.allow == ("frontend", "billing")
    assert p.access.allows("billing") and not p.access.allows("mallory")
    assert p.subset_labels("v2") == {"version": "v2", "track": "canary"}

    d = p.to_dict()
    assert d["timeout"] == "2s" and d["retries"]["per_try_timeout"] == "500ms"
    assert d["circuit_breaker"]["reset_timeout"] == "1m"
    assert d["routes"][1]["split"][2] == {"subset": None, "weight": 0}
    # JSON- and YAML-serialisable, and parses back to an equal policy both ways.
    assert parse_policy(json.dumps(d), KEY) == p
    assert parse_policy(yaml.safe_dump(d), KEY) == p
    assert parse_policy_dict(d, KEY) == p
    assert parse_policy_dict(d, KEY).to_dict() == d


def test_policy_is_copyable_picklable_and_hashable() -> None:
    p = parse_policy(FULL, KEY)
    assert copy.deepcopy(p) == p
    assert pickle.loads(pickle.dumps(p)) == p
    assert hash(p) == hash(parse_policy(FULL, KEY))


def test_json_document_is_accepted() -> None:
    p = parse_policy(b'{"timeout": "3s", "retries": {"attempts": 2}}', KEY)
    assert (p.timeout, p.retries.attempts) == (3.0, 2)


def test_null_timeout_means_no_deadline_and_numbers_are_seconds() -> None:
    p = parse_policy("timeout: null\nretries: {per_try_timeout: 1.5}", KEY)
    assert p.timeout is None and p.retries.per_try_timeout == 1.5


# --------------------------------------------------------------------------- refusals

# (document, field path, value as written, fragment of the reason)
BAD = [
    ("bogus: 1", "bogus", 1, "unknown field"),
    ("retries: {attemps: 3}", "retries.attemps", 3, "did you mean 'attempts'"),
    ("load_balancer: {ewma: {decay: 1s, half_life: 2s}}", "load_balancer.ewma.half_life", "2s",
     "unknown field"),
    ("retries: {attempts: '3'}", "retries.attempts", "3", "must be an integer, not a string"),
    ("retries: {attempts: true}", "retries.attempts", True, "must be an integer"),
    ("retries: 3", "retries", 3, "must be a mapping"),
    ("retries: {methods: GET}", "retries.methods", "GET", "must be a list"),
    ("circuit_breaker: {enabled: 'yes'}", "circuit_breaker.enabled", "yes", "true or false"),
    ("retries: {attempts: 9}", "retries.attempts", 9, "must be <= 5"),
    ("retries: {attempts: 0}", "retries.attempts", 0, "must be >= 1"),
    ("retries: {budget: {percent: 1001}}", "retries.budget.percent", 1001, "<= 1000"),
    ("retries: {hedging: {max_extra: 5}}", "retries.hedging.max_extra", 5, "<= 4"),
    ("load_balancer: {ring_size: 32}", "load_balancer.ring_size", 32, ">= 64"),
    ("outlier_detection: {max_ejection_percent: 101}", "outlier_detection.max_ejection_percent",
     101, "<= 100"),
    ("concurrency: {max_requests: 0}", "concurrency.max_requests", 0, ">= 1"),
    ("fault: {delay: {percent: 100.5}}", "fault.delay.percent", 100.5, "<= 100"),
    ("fault: {abort: {http_status: 99}}", "fault.abort.http_status", 99, ">= 200"),
    ("retries: {retriable_status_codes: [404, 600]}", "retries.retriable_status_codes[1]", 600,
     "<= 599"),
    ("timeout: 10 parsecs", "timeout", "10 parsecs", "unknown unit"),
    ("timeout: 0s", "timeout", "0s", "greater than 0"),
    ("timeout: -1s", "timeout", "-1s", "negative"),
    ("retries: {backoff: {base: 250}}", "retries.backoff.max", "250ms", "must be >= base (250s)"),
    ("retries: {backoff: {base: 1s, max: 100ms}}", "retries.backoff.max", "100ms",
     "must be >= base (1s)"),
    ("outlier_detection: {max_ejection_time: 10s}", "outlier_detection.max_ejection_time", "10s",
     "must be >= base_ejection_time (30s)"),
    ("retries: {per_try_timeout: 20s}", "retries.per_try_timeout", "20s",
     "must be <= timeout (15s)"),
    ("load_balancer: {policy: maglev}", "load_balancer.policy", "maglev", "must be one of"),
    ("retries: {retry_on: [5xx, 404]}", "retries.retry_on[1]", 404, "must be one of"),
    ("retries: {grpc_retry_on: [not-found]}", "retries.grpc_retry_on[0]", "not-found",
     "must be one of"),
    ("retries: {methods: [GET, FETCH]}", "retries.methods[1]", "FETCH", "must be one of"),
    ("retries: {methods: [GET, post]}", "retries.methods[1]", "post", "not idempotent"),
    ("fault: {abort: {grpc_status: teapot}}", "fault.abort.grpc_status", "teapot",
     "must be one of"),
    ("retries: {retry_on: [retriable-status-codes]}", "retries.retriable_status_codes", [],
     "at least one status code"),
    ("routes: [{split: [{subset: v3, weight: 1}]}]", "routes[0].split[0].subset", "v3",
     "no subset named 'v3'"),
    ("subsets: {v1: {}}\nroutes: [{split: [{weight: 1}]}, {split: [{subset: v1, weight: 1},"
     " {subset: v2, weight: 1}]}]", "routes[1].split[1].subset", "v2", "(v1)"),
    ("routes: [{split: [{weight: 0}, {weight: 0}]}]", "routes[0].split", [0, 0],
     "add up to more than 0"),
    ("routes: [{split: []}]", "routes[0].split", [], "at least 1 item"),
    ("routes: [{name: x}]", "routes[0].split", MISSING, "required"),
    ("routes: [{split: [{weight: 10001}]}]", "routes[0].split[0].weight", 10001, "<= 10000"),
    ("routes: [{match: {path_prefix: api}, split: [{weight: 1}]}]",
     "routes[0].match.path_prefix", "api", "must start with '/'"),
    ("routes: [{match: {headers: {x-canary: true}}, split: [{weight: 1}]}]",
     "routes[0].match.headers.x-canary", True, 'write "true"'),
    ("routes: [{match: {headers: {'bad header': x}}, split: [{weight: 1}]}]",
     "routes[0].match.headers.bad header", "bad header", "header name"),
    ("routes: [{match: {headers: {X-A: '1', x-a: '2'}}, split: [{weight: 1}]}]",
     "routes[0].match.headers.x-a", "2", "given twice"),
    ("load_balancer: {policy: ring_hash}", "load_balancer.hash_on", None,
     "required when policy is ring_hash"),
    ("load_balancer: {policy: ring_hash, hash_on: {header: a, cookie: b}}",
     "load_balancer.hash_on", {"header": "a", "cookie": "b"}, "exactly one"),
    ("subsets: {'v 1': {}}", "subsets.v 1", "v 1", "subset names"),
    ("subsets: {1: {}}", "subsets.1", 1, "keys must be strings"),
    ("on: x", "True", True, "booleans"),
    ("subsets: {v1: {labels: {version: 1}}}", "subsets.v1.labels.version", 1, "must be a string"),
    ("access: {allow: [Frontend]}", "access.allow[0]", "Frontend", "service name"),
    ("health_check: {interval: 0}", "health_check.interval", 0, "greater than 0"),
]


@pytest.mark.parametrize(("doc", "field", "value", "reason"), BAD, ids=[b[1] for b in BAD])
def test_bad_input_is_refused_with_path_value_and_reason(
    doc: str, field: str, value: object, reason: str
) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, KEY)
    err = info.value
    assert err.key == KEY
    matching = [e for e in err.errors if e.field == field]
    assert matching, f"no error for {field!r} in {err.errors}"
    e = matching[0]
    assert e.value == value and type(e.value) is type(value)
    assert reason in e.reason
    assert f"{KEY}: {field}=" in str(err)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ("retries: {attempts: 3\n", "YAML syntax error"),
        ("a: [", "YAML syntax error"),
        ("timeout: 1s\ntimeout: 2s\n", "duplicate key 'timeout'"),
        ('{"timeout": "1s", "timeout": "2s"}', "duplicate key"),
        ('{"timeout": "1s",, }', "JSON syntax error"),
        ("- timeout: 1s\n", "top level must be a mapping of policy fields, got a list"),
        ("just a string", "got a string"),
        ("42", "got a number"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_document_level_errors(doc: str | bytes, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, "orders.yaml")
    assert [e.field for e in info.value.errors] == [""]
    assert reason in info.value.errors[0].reason
    assert str(info.value).startswith("orders.yaml: <document>=")


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy("timeout: 1s\nretries:\n  attempts: [\n", KEY)
    assert "line 4" in info.value.errors[0].reason or "line 3" in info.value.errors[0].reason


def test_multiple_errors_are_all_reported_one_per_line() -> None:
    doc = """
timeout: soon
retries: {attempts: 7, retry_on: [teapot], attemps: 1}
load_balancer: {policy: ring_hash}
fault: {abort: {percent: 200}}
routes: [{split: [{weight: -1}]}]
"""
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, KEY)
    fields = set(info.value.fields())
    assert fields == {
        "timeout",
        "retries.attempts",
        "retries.retry_on[0]",
        "retries.attemps",
        "load_balancer.hash_on",
        "fault.abort.percent",
        "routes[0].split[0].weight",
    }
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.errors)
    assert all(line.startswith(f"{KEY}: ") for line in lines)
    assert f"{KEY}: retries.attempts=7: must be <= 5" in lines
    assert f"{KEY}: timeout='soon': " in str(info.value)


def test_policy_error_is_a_value_error_with_field_errors() -> None:
    with pytest.raises(ValueError) as info:
        parse_policy_dict({"concurrency": {"max_requests": 0}}, KEY)
    assert isinstance(info.value, PolicyError)
    assert info.value.errors == [FieldError("concurrency.max_requests", 0, "must be >= 1")]


def test_parse_policy_dict_refuses_non_mapping() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_dict(["timeout"], KEY)  # type: ignore[arg-type]
    assert info.value.errors[0].field == ""


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize(
    ("default", "service", "merged"),
    [
        (None, None, {}),
        ({"timeout": "5s"}, None, {"timeout": "5s"}),
        (None, {"timeout": "5s"}, {"timeout": "5s"}),
        ({"timeout": "5s"}, {"timeout": "1s"}, {"timeout": "1s"}),
        # Nested mappings merge key by key.
        (
            {"retries": {"attempts": 2, "backoff": {"base": "10ms", "max": "1s"}}},
            {"retries": {"backoff": {"max": "2s"}}},
            {"retries": {"attempts": 2, "backoff": {"base": "10ms", "max": "2s"}}},
        ),
        # Lists replace.
        (
            {"retries": {"retry_on": ["5xx", "reset"]}},
            {"retries": {"retry_on": ["connect-failure"]}},
            {"retries": {"retry_on": ["connect-failure"]}},
        ),
        ({"routes": [{"split": [{"weight": 1}]}]}, {"routes": []}, {"routes": []}),
        # An explicit null replaces (here: no overall deadline for this service).
        ({"timeout": "5s"}, {"timeout": None}, {"timeout": None}),
        # A mapping replaces a scalar and vice versa.
        ({"retries": 3}, {"retries": {"attempts": 2}}, {"retries": {"attempts": 2}}),
        ({"retries": {"attempts": 2}}, {"retries": None}, {"retries": None}),
        # Maps such as subsets merge by name.
        (
            {"subsets": {"v1": {"labels": {"version": "v1"}}}},
            {"subsets": {"v2": {"labels": {"version": "v2"}}}},
            {"subsets": {"v1": {"labels": {"version": "v1"}}, "v2": {"labels": {"version": "v2"}}}},
        ),
    ],
)
def test_merge_policy_dicts(default: dict | None, service: dict | None, merged: dict) -> None:
    assert merge_policy_dicts(default, service) == merged


def test_merge_does_not_modify_its_inputs() -> None:
    default = {"retries": {"attempts": 2, "retry_on": ["5xx"]}}
    service = {"retries": {"backoff": {"base": "1s", "max": "2s"}}}
    before = (copy.deepcopy(default), copy.deepcopy(service))
    merged = merge_policy_dicts(default, service)
    merged["retries"]["retry_on"].append("reset")
    merged["retries"]["backoff"]["max"] = "9s"
    assert (default, service) == before


@pytest.mark.parametrize(
    ("doc", "raw"),
    [
        ("", {}),
        ("~", {}),
        (b"retries: {attempts: 2}", {"retries": {"attempts": 2}}),
        ('{"timeout": null}', {"timeout": None}),
        # Only syntax is checked here; the schema is checked after merging.
        ("bogus: 1", {"bogus": 1}),
    ],
)
def test_load_policy_document_returns_the_raw_mapping(doc: str | bytes, raw: dict) -> None:
    assert load_policy_document(doc, KEY) == raw


def test_load_policy_document_refuses_syntax_errors_and_non_mappings() -> None:
    for doc in ("a: [", "[1]", "a: 1\na: 2\n"):
        with pytest.raises(PolicyError) as info:
            load_policy_document(doc, KEY)
        assert info.value.fields() == [""]


def test_merged_policy_validates_as_a_whole() -> None:
    default = yaml.safe_load("timeout: 1s\nsubsets: {v1: {labels: {version: v1}}}")
    service = yaml.safe_load("retries: {per_try_timeout: 2s}")
    with pytest.raises(PolicyError) as info:
        parse_policy_dict(merge_policy_dicts(default, service), KEY)
    assert info.value.fields() == ["retries.per_try_timeout"]
    service = yaml.safe_load("routes: [{split: [{subset: v1, weight: 1}]}]")
    p = parse_policy_dict(merge_policy_dicts(default, service), KEY)
    assert p.timeout == 1.0 and p.routes[0].split[0].subset == "v1"


# --------------------------------------------------------------------------- docs


def test_every_yaml_example_in_the_policy_reference_is_a_valid_policy() -> None:
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "policy.md"
    blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        parse_policy(block, "docs/policy.md")
