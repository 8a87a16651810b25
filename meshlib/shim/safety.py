"""What the shim refuses to forward, and which fields never cross it (RFC 9110, RFC 9112).

The shim is an HTTP intermediary on every pod, so it must not become an open proxy or an
SSRF gadget. A request's destination is the authority of an absolute-form target
(``GET http://orders/x``: what ``HTTP_PROXY`` clients send; RFC 9112 3.2.2 says to ignore
``Host`` then) or else the ``Host`` field. It is forwarded only when that is a mesh service
name (a single DNS label, or ``<service>.<mesh domain>``: the rule
``meshlib.discovery.mesh_names.mesh_service`` that ``meshlib.http`` uses for library clients). Refused, each with a status and a one-line body that says why:

* ``CONNECT`` (405): no tunnels to arbitrary ports;
* IP literals (403), including link-local metadata addresses such as 169.254.169.254 and
  ``[::1]``; names with dots or ``localhost`` (403: not a mesh service; the shim never
  resolves DNS);
* a port in the target equal to one of the shim's own listeners (403: a loop);
* a scheme other than ``http`` in absolute form (400).

Hop-by-hop fields (RFC 9110 7.6.1) are dropped in both directions: ``Connection`` and every
field it names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``,
``Transfer-Encoding`` (each leg is framed on its own), ``Upgrade`` (unless tunnelling),
``Proxy-Authorization`` and ``Proxy-Authenticate``. The mesh's own fields
(``x-mesh-timeout``, ``x-mesh-caller``) are replaced by the shim, not passed through.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from meshlib.discovery.mesh_names import mesh_service

HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})


class Refusal(Exception):
    """A request the shim will not forward: ``status`` and a short ``reason`` (the body)."""

    def __init__(self, status: int, reason: str, code: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code  # stable machine-readable kind (x-mesh-refused header, logs)


def split_authority(authority: bytes) -> tuple[str, int | None]:
    """``orders:8080`` -> (``orders``, 8080); ``[::1]:80`` -> (``::1``, 80). Lower-cased."""
    text = authority.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        host = text[1:end] if end > 0 else text
        rest = text[end + 1:] if end > 0 else ""
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    port = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise Refusal(400, f"bad port in {text!r}", "bad_authority")
        port = int(port_text)
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # inet_aton forms (0x7f.1, 2130706433) are not DNS labels either, and a single
        # all-digit label (2130706433) would pass is_service_name: refuse it as an address
        return host.isdigit() or host.startswith("0x")
    return True


def check_destination(host: str, port: int | None, own_ports: frozenset[int],
                      domains: tuple[str, ...] = ()) -> str:
    """The mesh service a request may go to, or raise :class:`Refusal`. The name rule is
    ``meshlib.discovery.mesh_names.mesh_service`` (the library clients' rule) under the
    mesh's ``domains``."""
    if not host:
        raise Refusal(400, "no destination: send Host: SERVICE or an absolute-form target",
                      "no_host")
    if _is_ip(host):
        kind = "a link-local address" if _link_local(host) else "an IP address"
        raise Refusal(403, f"destination {host!r} is {kind}: the shim only routes to mesh "
                      "services by name", "ip_literal")
    if port is not None and port in own_ports:
        raise Refusal(403, f"destination port {port} is one of this shim's own ports",
                      "own_port")
    service = mesh_service(host, domains)
    if service is None:
        raise Refusal(403, f"destination {host!r} is not a mesh service name (a single DNS "
                      "label such as 'orders', or orders.<mesh domain>); the shim does not "
                      "proxy to other hosts", "not_mesh_service")
    return service


def _link_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_link_local
    except ValueError:
        return False


def strip_hop_by_hop(headers: list[tuple[bytes, bytes]], keep_upgrade: bool = False,
                     drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """The end-to-end fields of ``headers`` (see the module docstring); ``drop``: more
    lower-case names to remove. ``keep_upgrade`` keeps ``Upgrade`` and a ``Connection:
    upgrade`` for a tunnelled upgrade request.

    One pass; the fields a ``Connection`` header names are removed in a second pass only
    when it names any besides ``close``/``keep-alive`` (rare)."""
    out = []
    named: set[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in drop:
            if lname == b"connection":
                for token in value.lower().split(b","):
                    t = token.strip()
                    if t and t not in _CONNECTION_OPTIONS:
                        if named is None:
                            named = set()
                        named.add(t)
            elif keep_upgrade and lname == b"upgrade":
                out.append((name, value))
            continue
        out.append((name, value))
    if named:
        out = [h for h in out if h[0].lower() not in named
               or (keep_upgrade and h[0].lower() == b"upgrade")]
    if keep_upgrade:
        out.append((b"Connection", b"upgrade"))
    return out


_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
