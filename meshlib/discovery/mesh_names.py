"""Which host names are mesh services: the one rule the HTTP router and the shim both call.

A host names the mesh service ``S`` when it is

* the single DNS label ``S`` (``orders``), or
* ``S.D`` where ``D`` is one of the configured **mesh domains** (``orders.mesh`` with
  domains ``["mesh"]``; ``orders.default.svc.cluster.local`` with
  ``["default.svc.cluster.local"]``): the service is the first label and everything after
  it must equal a domain exactly (meshlib has no namespaces, so a Kubernetes-style name
  lists its namespace in the domain);

where ``S`` is a valid service name (:func:`meshlib.discovery.keys.is_service_name`) and
not ``localhost``. Matching ignores case and one trailing dot (``orders.mesh.``). Anything
else (``localhost``, IP literals with dots, ``orders.other``, ``a.b.mesh``) is not a mesh
service. Ports are not part of the rule: callers split ``host:port`` first (what a port in
a mesh URL means is the caller's business: docs/http.md "Mesh names").

Domains come from ``Mesh(domains=[...])``, else ``MESHLIB_MESH_DOMAINS`` (comma-separated),
else the etcd key ``{prefix}/defaults/domains`` (docs/etcd-layout.md). A :class:`MeshNames`
holds the current set; readers cache per host and drop their cache when
:attr:`MeshNames.generation` changes (one integer compare per call).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final

from meshlib.discovery.keys import is_service_name

__all__ = ["ENV_DOMAINS", "MeshNames", "mesh_service", "parse_domains"]

ENV_DOMAINS: Final = "MESHLIB_MESH_DOMAINS"

_DOMAIN = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


def mesh_service(host: str, domains: tuple[str, ...] = ()) -> str | None:
    """The mesh service ``host`` names under ``domains`` (see the module docstring), or None.

    >>> mesh_service("orders"), mesh_service("orders.mesh", ("mesh",))
    ('orders', 'orders')
    >>> mesh_service("orders.mesh"), mesh_service("localhost"), mesh_service("10.0.0.1")
    (None, None, None)
    """
    h = host.lower()
    if h.endswith("."):
        h = h[:-1]
    label, dot, rest = h.partition(".")
    if dot and rest not in domains:
        return None
    if label == "localhost" or not is_service_name(label):
        return None
    return label


def parse_domains(value: Iterable[str] | str, where: str) -> tuple[str, ...]:
    """Mesh domains from a list, a comma-separated string or a JSON list (the etcd key's
    value); leading and trailing dots dropped, lower-cased, duplicates removed.

    Raises ValueError naming ``where`` (argument, variable or key), the bad value and the
    expected form."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"{where}: not a JSON list of domains ({exc}); write e.g. "
                                 '["mesh", "svc.cluster.local"] or mesh,svc.cluster.local') from None
            if not isinstance(value, list):
                raise ValueError(f"{where}: expected a list of domains, got {text!r}")
        else:
            value = text.split(",")
    out: list[str] = []
    for i, raw in enumerate(value):
        if not isinstance(raw, str):
            raise ValueError(f"{where}[{i}]={raw!r}: a mesh domain is a string such as 'mesh'")
        d = raw.strip().strip(".").lower()
        if not d:
            continue
        if not _DOMAIN.match(d) or len(d) > 253:
            raise ValueError(f"{where}[{i}]={raw!r}: not a DNS domain; use labels of a-z, "
                             "0-9 and '-' joined by dots, e.g. 'mesh' or "
                             "'default.svc.cluster.local'")
        if d not in out:
            out.append(d)
    return tuple(out)


class MeshNames:
    """The current mesh domains of one mesh; swapped whole by :meth:`set`.

    ``generation`` grows on every change, so a reader that caches per host can tell that
    its cache is stale with one compare."""

    __slots__ = ("domains", "generation", "source")

    def __init__(self, domains: tuple[str, ...] = (), source: str = "default") -> None:
        self.domains = domains
        self.source = source
        self.generation = 0

    def service_of(self, host: str) -> str | None:
        """:func:`mesh_service` under the current domains."""
        return mesh_service(host, self.domains)

    def set(self, domains: tuple[str, ...], source: str) -> None:
        """Replace the domains (watch thread); readers see the new tuple and generation."""
        if domains != self.domains:
            self.domains = domains
            self.source = source
            self.generation += 1

    def __repr__(self) -> str:
        return f"MeshNames(domains={list(self.domains)!r}, source={self.source!r})"
