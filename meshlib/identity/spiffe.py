"""SPIFFE IDs for mesh services: ``spiffe://<trust-domain>/svc/<service>``.

Rules from the SPIFFE ID specification (spiffe/spiffe, standards/SPIFFE-ID.md): the trust domain
is lower-case letters, digits, ``.``, ``-`` and ``_``; path segments are letters, digits, ``.``,
``-`` and ``_`` and are neither ``.`` nor ``..``; no query, fragment, port or user info.
The trust domain is a mesh setting: ``Mesh(trust_domain=...)``, else ``MESHLIB_TRUST_DOMAIN``,
else :data:`DEFAULT_TRUST_DOMAIN`.
"""

from __future__ import annotations

import os
import re

DEFAULT_TRUST_DOMAIN = "meshlib.local"
TRUST_DOMAIN_ENV = "MESHLIB_TRUST_DOMAIN"

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


class SpiffeIdError(ValueError):
    """A trust domain, service name or SPIFFE ID that breaks the SPIFFE ID rules."""


def resolve_trust_domain(trust_domain: str | None = None) -> str:
    """The explicit value, else ``MESHLIB_TRUST_DOMAIN``, else ``meshlib.local``; validated."""
    value = trust_domain or os.environ.get(TRUST_DOMAIN_ENV) or DEFAULT_TRUST_DOMAIN
    check_trust_domain(value)
    return value


def check_trust_domain(trust_domain: str) -> None:
    if not _TRUST_DOMAIN.match(trust_domain):
        raise SpiffeIdError(
            f"trust domain {trust_domain!r} is invalid: use lower-case letters, digits, "
            "'.', '-' and '_' (e.g. 'meshlib.local')"
        )


def check_service(service: str) -> None:
    if not _SEGMENT.match(service) or service in (".", ".."):
        raise SpiffeIdError(
            f"service name {service!r} cannot be a SPIFFE path segment: use letters, digits, "
            "'.', '-' and '_'"
        )


def spiffe_id(trust_domain: str, service: str) -> str:
    """``spiffe://<trust_domain>/svc/<service>`` after checking both parts."""
    check_trust_domain(trust_domain)
    check_service(service)
    return f"spiffe://{trust_domain}/svc/{service}"


def parse_spiffe_id(value: str) -> tuple[str, str]:
    """``(trust_domain, service)`` of a mesh service SPIFFE ID, or :class:`SpiffeIdError`."""
    prefix = "spiffe://"
    if not value.startswith(prefix):
        raise SpiffeIdError(f"{value!r} is not a SPIFFE ID (must start with 'spiffe://')")
    rest = value[len(prefix) :]
    trust_domain, sep, path = rest.partition("/")
    parts = path.split("/") if sep else []
    if len(parts) != 2 or parts[0] != "svc":
        raise SpiffeIdError(
            f"{value!r} is not a mesh service identity (expected spiffe://<trust-domain>/svc/<service>)"
        )
    check_trust_domain(trust_domain)
    check_service(parts[1])
    return trust_domain, parts[1]
