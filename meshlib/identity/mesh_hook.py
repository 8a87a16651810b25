"""How a :class:`~meshlib.mesh.Mesh` turns its ``identity`` argument into an IdentitySource.

Kept out of mesh.py so the Mesh only holds one attribute (``mesh.identity``) and one call each
at start and close:

* ``identity=False`` (default): no identity (``mesh.identity`` is None, clear text).
* ``identity=True``: an :class:`~meshlib.identity.etcd_source.EtcdIdentitySource` for
  ``Mesh(service=...)`` on the mesh's etcd client and watch stream. The constructor waits up to
  ``identity_timeout`` seconds for the first certificate (as Istio's agent holds the workload
  until its certificate is ready) and raises :class:`IdentityUnavailable` with the reason when
  none came; later renewals never block anything.
* an ``IdentitySource`` object: used as is (certificates from files, tests).
"""

from __future__ import annotations

from typing import Any

from meshlib.identity.source import IdentitySource, IdentityUnavailable


def start_identity(
    mesh: Any, identity: bool | IdentitySource | None, trust_domain: str | None, timeout: float
) -> IdentitySource | None:
    if identity is None or identity is False:
        return None
    if identity is not True:
        if not isinstance(identity, IdentitySource):
            raise TypeError(
                f"Mesh(identity=...): expected True, False or an IdentitySource, got {identity!r}"
            )
        return identity
    if not mesh.service:
        raise ValueError("Mesh(identity=True) needs service=...: the identity is the service's")
    from meshlib.identity.etcd_source import EtcdIdentitySource

    source = EtcdIdentitySource(
        mesh.client,
        mesh.service,
        prefix=mesh.layout.prefix,
        trust_domain=trust_domain,
        watch_manager=mesh._watcher,
    )
    if not source.wait_ready(timeout):
        reason = source.last_error or "no answer yet"
        source.close()
        raise IdentityUnavailable(
            f"no certificate for {source.spiffe_id} within {timeout:g}s: {reason}"
        )
    return source


def close_identity(source: IdentitySource | None, owned: bool) -> None:
    close = getattr(source, "close", None)
    if owned and close is not None:
        close()
