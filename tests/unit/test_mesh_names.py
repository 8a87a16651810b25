"""The mesh naming rule (``meshlib.discovery.mesh_names``), as a table."""

from __future__ import annotations

import pytest

from meshlib.discovery.mesh_names import MeshNames, mesh_service, parse_domains

DOMAINS = ("mesh", "default.svc.cluster.local")


@pytest.mark.parametrize(("host", "service"), [
    ("orders", "orders"),
    ("ORDERS", "orders"),
    ("orders.", "orders"),
    ("orders.mesh", "orders"),
    ("Orders.Mesh.", "orders"),
    ("orders.default.svc.cluster.local", "orders"),
    ("orders.svc.cluster.local", None),       # a domain must match whole
    ("a.orders.mesh", None),                  # the service is one label
    ("orders.internal", None),
    ("localhost", None),
    ("localhost.mesh", None),
    ("127.0.0.1", None),
    ("-bad.mesh", None),
    ("", None),
])
def test_mesh_service(host: str, service: str | None) -> None:
    assert mesh_service(host, DOMAINS) == service


def test_without_domains_only_single_labels() -> None:
    assert mesh_service("orders.mesh") is None
    assert mesh_service("orders") == "orders"


@pytest.mark.parametrize(("value", "want"), [
    ("mesh, svc.cluster.local", ("mesh", "svc.cluster.local")),
    ('["mesh", ".Internal."]', ("mesh", "internal")),
    (["mesh", "mesh", ""], ("mesh",)),
    ("", ()),
])
def test_parse_domains(value: object, want: tuple[str, ...]) -> None:
    assert parse_domains(value, "here") == want  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "message"), [
    ("mesh,bad_domain", r"here\[1\]='bad_domain': not a DNS domain"),
    ('["mesh", 3]', r"here\[1\]=3: a mesh domain is a string"),
    ("[mesh", r"here: not a JSON list of domains"),
    ('{"a": 1}', r"here: expected a list of domains"),
])
def test_parse_domains_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_domains(value, "here")


def test_generation_changes_only_on_a_new_value() -> None:
    names = MeshNames()
    names.set(("mesh",), "k")
    names.set(("mesh",), "k")
    assert names.generation == 1 and names.service_of("orders.mesh") == "orders"
