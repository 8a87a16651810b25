"""The mesh mTLS decisions (meshlib.core.mtls) as tables, and the policy and record fields that
feed them."""

from __future__ import annotations

import pytest

from meshlib.config import PolicyError
from meshlib.config.policy import parse_policy
from meshlib.core.mtls import (
    BAD_IDENTITY,
    NO_IDENTITY,
    WRONG_IDENTITY,
    MtlsRefused,
    check_server_identity,
    inbound_caller,
    peer_spiffe_id,
    service_of,
    use_tls,
)


@pytest.mark.parametrize(("mode", "endpoint_tls", "have_identity", "expected"), [
    ("off", True, True, False),
    ("off", False, False, False),
    ("permissive", True, True, True),
    ("permissive", False, True, False),
    ("permissive", True, False, False),
    ("strict", False, True, True),
    ("strict", True, True, True),
])
def test_use_tls(mode: str, endpoint_tls: bool, have_identity: bool, expected: bool) -> None:
    assert use_tls(mode, endpoint_tls, have_identity) is expected


def test_strict_without_identity_is_refused_not_sent_in_clear() -> None:
    with pytest.raises(MtlsRefused, match="strict .* no mesh identity") as info:
        use_tls("strict", True, False)
    assert info.value.reason == NO_IDENTITY


@pytest.mark.parametrize(("mode", "verified", "header", "expected"), [
    ("off", None, "billing", "billing"),
    ("permissive", None, "billing", "billing"),
    ("permissive", "gateway", "billing", "gateway"),
    ("strict", "gateway", "billing", "gateway"),
    ("strict", None, "billing", None),  # a forged header changes nothing
    ("strict", None, "", None),
])
def test_inbound_caller(mode: str, verified: str | None, header: str,
                        expected: str | None) -> None:
    assert inbound_caller(mode, verified, header) == expected


def test_peer_spiffe_id_needs_exactly_one() -> None:
    assert peer_spiffe_id(["spiffe://td/svc/a", "https://x"]) == "spiffe://td/svc/a"
    for sans in ([], ["spiffe://td/svc/a", "spiffe://td/svc/b"]):
        with pytest.raises(MtlsRefused) as info:
            peer_spiffe_id(sans)
        assert info.value.reason == BAD_IDENTITY


def test_service_of() -> None:
    assert service_of("spiffe://meshlib.local/svc/orders") == "orders"
    for bad in ("spiffe://td/ns/orders", "spiffe://td/svc/", "spiffe://td/svc/a/b",
                "https://td/svc/a", "spiffe://td"):
        assert service_of(bad) is None


def test_server_identity_must_be_the_destination() -> None:
    check_server_identity("spiffe://td/svc/orders", "spiffe://td/svc/orders")
    with pytest.raises(MtlsRefused, match="'spiffe://td/svc/billing', expected") as info:
        check_server_identity("spiffe://td/svc/billing", "spiffe://td/svc/orders")
    assert info.value.reason == WRONG_IDENTITY


def test_policy_mtls_mode() -> None:
    assert parse_policy("", "k").mtls.mode == "permissive"
    assert parse_policy("mtls: {mode: STRICT}", "k").mtls.mode == "strict"
    with pytest.raises(PolicyError, match="mtls.mode"):
        parse_policy("mtls: {mode: required}", "k")


def test_grpc_refusal_reasons_from_grpc_core_texts() -> None:
    from meshlib.grpc.mtls import tls_refusal_reason

    assert tls_refusal_reason(
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Custom "
        "verification check failed with error: UNAUTHENTICATED: Hostname Verification Check "
        "failed.") == WRONG_IDENTITY
    assert tls_refusal_reason("failed to connect to all addresses; last error: UNAVAILABLE: "
                              "ipv4:127.0.0.1:1: Ssl handshake failed (TSI_PROTOCOL_FAILURE): "
                              "SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED") == "handshake"
    assert tls_refusal_reason("failed to connect to all addresses; last error: UNAVAILABLE: "
                              "ipv4:127.0.0.1:1: Connection refused") is None
    assert tls_refusal_reason(None) is None
