"""Instance records: the JSON value of ``{prefix}/services/{svc}/instances/{id}``.

A record is what :meth:`meshlib.core.endpoints.Endpoint.to_record` writes::

    {"address": "10.0.0.7", "port": 8080, "protocol": "http", "zone": "eu-1a",
     "weight": 100, "labels": {"version": "v2"}, "metadata": {...}, "tls": true}

``tls`` (default false): the instance accepts mesh mTLS on its port (meshlib.core.mtls).

``address`` and ``port`` are required; types are checked strictly (``"8080"`` is not a
port). Unlike policies, records are read leniently *at the top level*: fields this version
does not know are ignored (logged at debug level) so that newer registrars can add fields
without breaking older callers, the rule protobuf and Kubernetes apply to unknown fields.
A record that is malformed is refused with a :class:`RecordError` naming the key, field and
value; the discovery layer then leaves that instance out of the snapshot.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from meshlib.config.documents import decode_text
from meshlib.config.errors import FieldError, RecordError, field_errors_from_pydantic
from meshlib.core.endpoints import Endpoint

__all__ = ["parse_instance_record"]

log = logging.getLogger(__name__)

# RFC 1123 host name: dot-separated labels of letters, digits and '-', 1-63 chars each,
# not starting or ending with '-'; at most 253 characters. '_' is tolerated (it appears in
# real internal DNS names, e.g. Docker Compose service names).
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def _address(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # the str type check reports it
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]  # tolerate a bracketed IPv6 literal
    if not text:
        raise PydanticCustomError("address", "{reason}", {"reason": "address is empty"})
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified:
            raise PydanticCustomError("address", "{reason}", {
                "reason": "unspecified address (a bind address, not one callers can reach); "
                          "register the instance's reachable IP or host name"
            })
        return str(ip) if "%" not in text else text
    host = text[:-1] if text.endswith(".") else text
    if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise PydanticCustomError("address", "{reason}", {
            "reason": "not an IP address or host name (RFC 1123 labels of a-z, 0-9, '-')"
        })
    if host.replace(".", "").isdigit():
        raise PydanticCustomError("address", "{reason}", {"reason": "not a valid IPv4 address"})
    return host


def _protocol(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    address: Annotated[str, BeforeValidator(_address)]
    port: int = Field(ge=1, le=65535)
    protocol: Annotated[Literal["http", "grpc"], BeforeValidator(_protocol)] = "http"
    zone: str | None = Field(default=None, min_length=1, max_length=128)
    weight: int = Field(default=100, ge=1, le=10_000)
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    tls: bool = False


_KNOWN = frozenset(_Record.model_fields)


def parse_instance_record(
    key: str, data: bytes | str, *, service: str, instance_id: str
) -> Endpoint:
    """Validate one instance record and return it as an :class:`Endpoint` whose ``key`` is
    ``key``. Raises :class:`RecordError` listing every problem found."""
    text = decode_text(data, key, RecordError)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(key, [FieldError(
            "", text[:60], f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        )]) from None
    if not isinstance(raw, Mapping):
        raise RecordError(key, [FieldError(
            "", raw, f"an instance record must be a JSON object, got {type(raw).__name__}"
        )])
    try:
        rec = _Record.model_validate(raw)
    except ValidationError as exc:
        raise RecordError(key, field_errors_from_pydantic(exc, raw, _Record)) from None
    unknown = sorted(k for k in raw if k not in _KNOWN)
    if unknown:
        log.debug("instance record %s: ignoring unknown fields %s", key, ", ".join(unknown))
    return Endpoint(
        service=service,
        instance_id=instance_id,
        address=rec.address,
        port=rec.port,
        protocol=rec.protocol,
        zone=rec.zone,
        weight=rec.weight,
        labels=MappingProxyType(dict(rec.labels)),
        metadata=MappingProxyType(dict(rec.metadata)),
        key=key,
        tls=rec.tls,
    )
