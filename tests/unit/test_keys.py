"""The etcd key layout (docs/etcd-layout.md) and name rules."""

from __future__ import annotations

import pytest

from meshlib.discovery.keys import (
    InvalidName,
    KeyLayout,
    check_instance_id,
    check_service_name,
    is_service_name,
)


@pytest.mark.parametrize("name", ["orders", "a", "user-profile", "a1", "x" * 63])
def test_valid_service_names(name):
    assert is_service_name(name) and check_service_name(name) == name


@pytest.mark.parametrize("name", ["", "Orders", "my_service", "-a", "a-", "a.b", "x" * 64,
                                  "127.0.0.1", "a b"])
def test_invalid_service_names(name):
    assert not is_service_name(name)
    with pytest.raises(InvalidName, match="DNS label"):
        check_service_name(name)


def test_instance_ids():
    assert check_instance_id("127.0.0.1-8080-ab12cd34") == "127.0.0.1-8080-ab12cd34"
    with pytest.raises(InvalidName):
        check_instance_id("a/b")


def test_layout_builds_and_parses_every_key():
    k = KeyLayout("meshlib/v1/")  # normalised to /meshlib/v1
    assert k.prefix == "/meshlib/v1"
    assert k.instance_key("orders", "i1") == "/meshlib/v1/services/orders/instances/i1"
    assert k.policy_key("orders") == "/meshlib/v1/services/orders/policy"
    assert k.default_policy_key == "/meshlib/v1/defaults/policy"
    assert k.parse(k.instance_key("orders", "i1")) == ("instance", "orders", "i1")
    assert k.parse(k.policy_key("orders")) == ("policy", "orders", None)
    assert k.parse(k.default_policy_key) == ("default-policy", "", None)
    assert k.parse("/meshlib/v1/services/orders/other") is None
    assert k.parse("/elsewhere/services/orders/policy") is None
    # the trailing slash keeps one service's watch from seeing another with a longer name
    assert not k.instance_key("orders-v2", "i").startswith(k.service_prefix("orders"))
