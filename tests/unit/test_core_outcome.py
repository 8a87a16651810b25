"""Classification tables for meshlib.core.outcome (Envoy retry_on semantics)."""

from __future__ import annotations

import pytest

from meshlib.core.outcome import (
    ERR_CANCELLED,
    ERR_CONNECT,
    ERR_REFUSED_STREAM,
    ERR_RESET,
    ERR_TIMEOUT,
    Outcome,
    classify_grpc,
    classify_http,
    counts_as_5xx_for_outlier,
    counts_as_failure_for_breaker,
    counts_as_gateway_failure,
    grpc_status_for_http,
    is_retryable_grpc,
    is_retryable_http,
)

OC = Outcome


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, None, OC.SUCCESS),
        (204, None, OC.SUCCESS),
        (301, None, OC.SUCCESS),
        (400, None, OC.HTTP_4XX),
        (404, None, OC.HTTP_4XX),
        (409, None, OC.HTTP_4XX),
        (429, None, OC.HTTP_4XX),
        (500, None, OC.HTTP_5XX),
        (501, None, OC.HTTP_5XX),
        (502, None, OC.GATEWAY_ERROR),
        (503, None, OC.GATEWAY_ERROR),
        (504, None, OC.GATEWAY_ERROR),
        (None, ERR_CONNECT, OC.CONNECT_FAILURE),
        (None, ERR_RESET, OC.RESET),
        (None, ERR_REFUSED_STREAM, OC.REFUSED_STREAM),
        (None, ERR_TIMEOUT, OC.TIMEOUT),
        (None, ERR_CANCELLED, OC.LOCAL),
        (None, "something-else", OC.LOCAL),
        (None, None, OC.LOCAL),
        (503, ERR_RESET, OC.RESET),  # the error kind wins
    ],
)
def test_classify_http_table(status, error, expected):
    assert classify_http(status, error) is expected


@pytest.mark.parametrize(
    ("code", "expected", "http"),
    [
        ("OK", OC.SUCCESS, 200),
        ("UNAVAILABLE", OC.GATEWAY_ERROR, 503),
        ("unavailable", OC.GATEWAY_ERROR, 503),
        ("DEADLINE_EXCEEDED", OC.TIMEOUT, 504),
        ("deadline-exceeded", OC.TIMEOUT, 504),
        ("INTERNAL", OC.HTTP_5XX, 500),
        ("UNKNOWN", OC.HTTP_5XX, 500),
        ("DATA_LOSS", OC.HTTP_5XX, 500),
        ("UNIMPLEMENTED", OC.HTTP_5XX, 501),
        ("CANCELLED", OC.LOCAL, 499),
        ("RESOURCE_EXHAUSTED", OC.HTTP_4XX, 429),
        ("NOT_FOUND", OC.HTTP_4XX, 404),
        ("INVALID_ARGUMENT", OC.HTTP_4XX, 400),
        ("UNAUTHENTICATED", OC.HTTP_4XX, 401),
        ("NO_SUCH_CODE", OC.HTTP_5XX, 500),
    ],
)
def test_classify_grpc_table(code, expected, http):
    assert classify_grpc(code) is expected
    assert grpc_status_for_http(code) == http


# (outcome, status, retry_on, retriable codes, expected)
RETRY_TABLE = [
    (OC.CONNECT_FAILURE, None, {"connect-failure"}, (), True),
    (OC.RESET, None, {"connect-failure"}, (), False),
    (OC.REFUSED_STREAM, None, {"refused-stream"}, (), True),
    (OC.REFUSED_STREAM, None, {"connect-failure"}, (), False),
    (OC.RESET, None, {"reset"}, (), True),
    (OC.CONNECT_FAILURE, None, {"reset"}, (), True),
    (OC.TIMEOUT, None, {"reset"}, (), True),
    (OC.GATEWAY_ERROR, 503, {"reset"}, (), False),
    # 5xx includes connect failure, reset, refused stream, timeout (Envoy docs)
    (OC.HTTP_5XX, 500, {"5xx"}, (), True),
    (OC.GATEWAY_ERROR, 502, {"5xx"}, (), True),
    (OC.CONNECT_FAILURE, None, {"5xx"}, (), True),
    (OC.RESET, None, {"5xx"}, (), True),
    (OC.REFUSED_STREAM, None, {"5xx"}, (), True),
    (OC.TIMEOUT, None, {"5xx"}, (), True),
    (OC.HTTP_4XX, 409, {"5xx"}, (), False),
    # gateway-error = 502/503/504 (+ resets, which Envoy maps to 503/504)
    (OC.GATEWAY_ERROR, 502, {"gateway-error"}, (), True),
    (OC.GATEWAY_ERROR, 503, {"gateway-error"}, (), True),
    (OC.GATEWAY_ERROR, 504, {"gateway-error"}, (), True),
    (OC.HTTP_5XX, 500, {"gateway-error"}, (), False),
    (OC.RESET, None, {"gateway-error"}, (), True),
    # retriable-4xx = 409 only
    (OC.HTTP_4XX, 409, {"retriable-4xx"}, (), True),
    (OC.HTTP_4XX, 404, {"retriable-4xx"}, (), False),
    (OC.HTTP_4XX, 429, {"retriable-4xx"}, (), False),
    # retriable-status-codes
    (OC.HTTP_4XX, 429, {"retriable-status-codes"}, (429,), True),
    (OC.HTTP_5XX, 500, {"retriable-status-codes"}, (429,), False),
    (OC.HTTP_4XX, 429, set(), (429,), False),  # codes listed but condition not enabled
    # never
    (OC.SUCCESS, 200, {"5xx", "reset", "retriable-status-codes"}, (200,), False),
    (OC.LOCAL, None, {"5xx", "reset", "connect-failure"}, (), False),
]


@pytest.mark.parametrize(("outcome", "status", "retry_on", "codes", "expected"), RETRY_TABLE)
def test_is_retryable_http_table(outcome, status, retry_on, codes, expected):
    assert is_retryable_http(outcome, status, frozenset(retry_on), frozenset(codes)) is expected


@pytest.mark.parametrize(
    ("code", "retry_on", "expected"),
    [
        ("UNAVAILABLE", {"unavailable"}, True),
        ("unavailable", {"unavailable"}, True),
        ("DEADLINE_EXCEEDED", {"deadline-exceeded"}, True),
        ("DEADLINE_EXCEEDED", {"DEADLINE_EXCEEDED"}, True),
        ("RESOURCE_EXHAUSTED", {"unavailable"}, False),
        ("INTERNAL", {"internal", "cancelled"}, True),
        ("OK", {"unavailable"}, False),
    ],
)
def test_is_retryable_grpc_table(code, retry_on, expected):
    assert is_retryable_grpc(code, frozenset(retry_on)) is expected


@pytest.mark.parametrize(
    ("outcome", "breaker", "c5xx", "gateway"),
    [
        (OC.SUCCESS, False, False, False),
        (OC.HTTP_4XX, False, False, False),
        (OC.LOCAL, False, False, False),
        (OC.HTTP_5XX, True, True, False),
        (OC.GATEWAY_ERROR, True, True, True),
        (OC.CONNECT_FAILURE, True, True, True),
        (OC.RESET, True, True, True),
        (OC.REFUSED_STREAM, True, True, True),
        (OC.TIMEOUT, True, True, True),
    ],
)
def test_health_accounting_table(outcome, breaker, c5xx, gateway):
    assert counts_as_failure_for_breaker(outcome) is breaker
    assert counts_as_5xx_for_outlier(outcome) is c5xx
    assert counts_as_gateway_failure(outcome) is gateway
