"""The identity part of the etcd key layout (documented in docs/etcd-layout.md)::

    {prefix}/identity/bundle                       PEM trust bundle (roots); written by the signer
    {prefix}/identity/csr/{service}/{request_id}   PEM CSR; written by service {service}'s etcd user
    {prefix}/identity/certs/{service}/{request_id} JSON answer; written by the signer, on a lease
    {prefix}/identity/signer/leader                the active signer's name, on its lease

etcd permissions follow the layout: service X's user gets ``readwrite`` on
``{prefix}/identity/csr/X/`` (note the trailing slash: without it ``X`` would also cover
``X-admin``) and ``read`` on ``{prefix}/identity/certs/X/`` and ``{prefix}/identity/bundle``;
the signer's user gets ``readwrite`` on ``{prefix}/identity/``.

An answer is ``{"status": "issued", "chain": PEM, "not_after": ISO-8601}`` or
``{"status": "refused", "code": ..., "reason": ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meshlib.discovery.keys import DEFAULT_PREFIX, KeyLayout, check_service_name


@dataclass(frozen=True)
class IdentityKeys:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", KeyLayout(self.prefix).prefix)

    @property
    def root(self) -> str:
        return f"{self.prefix}/identity/"

    @property
    def bundle(self) -> str:
        return f"{self.prefix}/identity/bundle"

    @property
    def csr_root(self) -> str:
        return f"{self.prefix}/identity/csr/"

    def csr_prefix(self, service: str) -> str:
        return f"{self.csr_root}{check_service_name(service)}/"

    def csr(self, service: str, request_id: str) -> str:
        return self.csr_prefix(service) + request_id

    def certs_prefix(self, service: str) -> str:
        return f"{self.prefix}/identity/certs/{check_service_name(service)}/"

    def cert(self, service: str, request_id: str) -> str:
        return self.certs_prefix(service) + request_id

    @property
    def leader(self) -> str:
        return f"{self.prefix}/identity/signer/leader"

    def parse_csr_key(self, key: str) -> tuple[str, str] | None:
        """``(service, request_id)`` of a CSR key, or None when the key is not one."""
        if not key.startswith(self.csr_root):
            return None
        parts = key[len(self.csr_root) :].split("/")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            return None
        return parts[0], parts[1]


def issued_answer(chain_pem: bytes, not_after: str) -> bytes:
    return json.dumps({"status": "issued", "chain": chain_pem.decode(), "not_after": not_after}).encode()


def refused_answer(code: str, reason: str) -> bytes:
    return json.dumps({"status": "refused", "code": code, "reason": reason}).encode()


def parse_answer(value: bytes) -> dict[str, Any]:
    data = json.loads(value)
    if not isinstance(data, dict) or data.get("status") not in ("issued", "refused"):
        raise ValueError(f"not a signer answer: {value[:80]!r}")
    return data
