"""The etcd key layout: a public contract, documented in docs/etcd-layout.md.

Everything lives under a versioned prefix (default ``/meshlib/v1``)::

    {prefix}/services/{service}/instances/{instance_id}   JSON instance record, on a lease
    {prefix}/services/{service}/policy                    YAML or JSON policy for callers of {service}
    {prefix}/defaults/policy                              YAML or JSON policy applied to every service

One watch on ``{prefix}/services/{service}/`` sees both the instances and the policy of
a service, so a client that calls N services holds N + 1 watches (plus the defaults key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "/meshlib/v1"

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_INSTANCE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class InvalidName(ValueError):
    """A service or instance name that cannot be used in the key layout."""


def is_service_name(name: str) -> bool:
    """Whether ``name`` can be a mesh service name (a DNS label, RFC 1123)."""
    return isinstance(name, str) and _NAME.match(name) is not None


def check_service_name(name: str) -> str:
    """Service names are DNS labels (RFC 1123): lowercase letters, digits and '-', <= 63 chars."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(
            f"invalid service name {name!r}: use a DNS label (a-z, 0-9, '-', at most 63 characters)"
        )
    return name


def check_instance_id(instance_id: str) -> str:
    if not isinstance(instance_id, str) or not _INSTANCE.match(instance_id):
        raise InvalidName(
            f"invalid instance id {instance_id!r}: use 1-128 characters of A-Z a-z 0-9 . _ : -"
        )
    return instance_id


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Builds and parses meshlib keys under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        p = self.prefix.rstrip("/")
        if not p.startswith("/"):
            p = "/" + p
        object.__setattr__(self, "prefix", p)

    @property
    def services_prefix(self) -> str:
        return f"{self.prefix}/services/"

    def service_prefix(self, service: str) -> str:
        return f"{self.prefix}/services/{check_service_name(service)}/"

    def instances_prefix(self, service: str) -> str:
        return self.service_prefix(service) + "instances/"

    def instance_key(self, service: str, instance_id: str) -> str:
        return self.instances_prefix(service) + check_instance_id(instance_id)

    def policy_key(self, service: str) -> str:
        return self.service_prefix(service) + "policy"

    @property
    def default_policy_key(self) -> str:
        return f"{self.prefix}/defaults/policy"

    @property
    def domains_key(self) -> str:
        """The mesh domains (``meshlib.discovery.mesh_names``): a JSON list or
        comma-separated text."""
        return f"{self.prefix}/defaults/domains"

    def parse(self, key: str) -> tuple[str, str, str | None] | None:
        """Classify a key: ``("instance", service, id)``, ``("policy", service, None)``,
        ``("default-policy", "", None)``, or ``None`` for keys outside the layout."""
        if key == self.default_policy_key:
            return ("default-policy", "", None)
        sp = self.services_prefix
        if not key.startswith(sp):
            return None
        rest = key[len(sp):].split("/")
        if len(rest) == 2 and rest[1] == "policy":
            return ("policy", rest[0], None)
        if len(rest) == 3 and rest[1] == "instances" and rest[2]:
            return ("instance", rest[0], rest[2])
        return None
