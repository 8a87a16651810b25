"""Request routing to subsets, weighted splits, and fault injection decisions.

:class:`Router` is built once per snapshot from ``policy.subsets``, ``policy.routes`` and the
endpoint list (Envoy route matching + subset load balancer; Istio ``DestinationRule``
subsets and ``VirtualService`` weighted routes):

* A subset is the endpoints whose labels include all of the subset's ``labels``; each
  subset's endpoint tuple is computed once here.
* Routes are tried in order; the first whose ``match`` holds wins. A match requires every
  listed header to be present with exactly the given value (names are lowercase; the driver's
  ``headers_lookup`` takes a lowercase name) and the path to start with ``path_prefix``.
* The winning route's ``split`` is a weighted choice among destinations (``subset: null`` is
  all endpoints): cumulative weights precomputed, one ``rng.random()`` draw and a bisect per
  call, no draw when only one destination has weight.
* No matching route: all endpoints.
* A destination subset with no endpoints stays empty: the driver fails the call with 503
  "no endpoints in subset X", like Envoy's subset load balancer with its default
  ``fallback_policy: NO_FALLBACK`` ("no healthy upstream"). Silently spilling canary traffic
  onto the stable version would hide exactly what a split is for.

Each choice is a precomputed :class:`Destination` value naming the route and subset, so a
driver can log and count "why was my request routed there" without allocating.

:class:`FaultInjector` (Envoy HTTP fault filter ``delay`` / ``abort`` percentages) decides per
call whether to delay and/or abort; delay and abort are drawn independently, as in Envoy.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshlib.core.endpoints import Endpoint

__all__ = ["NO_FAULT", "Destination", "FaultInjector", "Router", "subset_endpoints"]


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a request goes: ``endpoints`` (the candidates), the ``route`` name (``None``:
    no route matched), the ``subset`` name (``None``: all endpoints), and ``target``, the
    object the router's ``build`` function made from ``endpoints`` (e.g. a balancer)."""

    route: str | None
    subset: str | None
    endpoints: tuple[Endpoint, ...]
    target: Any = None


def _labels_of(subset: Any) -> Mapping[str, str]:
    labels = getattr(subset, "labels", None)
    if labels is None and isinstance(subset, Mapping):
        labels = subset.get("labels", subset)
    return labels or {}


def subset_endpoints(
    endpoints: Iterable[Endpoint], labels: Mapping[str, str]
) -> tuple[Endpoint, ...]:
    """Endpoints whose labels include every ``labels`` item (empty selector: all)."""
    items = tuple(labels.items())
    return tuple(e for e in endpoints if all(e.labels.get(k) == v for k, v in items))


class _Route:
    __slots__ = ("name", "headers", "prefix", "cum", "total", "dests", "single")

    def __init__(self, name: str, headers: tuple[tuple[str, str], ...], prefix: str | None,
                 weights: list[int], dests: list[Destination]) -> None:
        self.name = name
        self.headers = headers
        self.prefix = prefix
        keep = [(w, d) for w, d in zip(weights, dests, strict=True) if w > 0]
        cum: list[int] = []
        acc = 0
        for w, _ in keep:
            acc += w
            cum.append(acc)
        self.cum = tuple(cum)
        self.total = acc
        self.dests = tuple(d for _, d in keep)
        self.single = self.dests[0] if len(self.dests) == 1 else None


class Router:
    """Routes and subsets, precomputed for one endpoint list.

    ``build`` is applied once to every distinct destination endpoint tuple (e.g.
    ``lambda eps: eps`` or a function making a balancer group) and stored as
    ``Destination.target``.
    """

    def __init__(
        self,
        subsets: Mapping[str, Any] | None,
        routes: Iterable[Any] | None,
        endpoints: Iterable[Endpoint],
        *,
        build: Callable[[tuple[Endpoint, ...]], Any] | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        built: dict[int, Any] = {}

        def target(eps: tuple[Endpoint, ...]) -> Any:
            if build is None:
                return eps
            t = built.get(id(eps))
            if t is None:
                t = built[id(eps)] = build(eps)
            return t

        self.subsets: dict[str, tuple[Endpoint, ...]] = {}
        dest_by_subset: dict[str, Destination] = {}
        for name, sub in (subsets or {}).items():
            eps = subset_endpoints(self.endpoints, _labels_of(sub))
            if eps == self.endpoints:
                eps = self.endpoints  # share the tuple (and the balancer group)
            self.subsets[name] = eps
        self.default = Destination(None, None, self.endpoints, target(self.endpoints))

        compiled: list[_Route] = []
        for i, r in enumerate(routes or ()):
            rname = getattr(r, "name", None) or f"routes[{i}]"
            match = getattr(r, "match", None)
            headers: tuple[tuple[str, str], ...] = ()
            prefix = None
            if match is not None:
                headers = tuple(
                    (k.lower(), v) for k, v in (getattr(match, "headers", None) or {}).items()
                )
                prefix = getattr(match, "path_prefix", None)
            weights: list[int] = []
            dests: list[Destination] = []
            for j, sp in enumerate(r.split):
                sname = sp.subset
                if sname is None:
                    eps = self.endpoints
                elif sname in self.subsets:
                    eps = self.subsets[sname]
                else:
                    known = ", ".join(sorted(self.subsets)) or "none defined"
                    raise ValueError(
                        f"routes[{i}].split[{j}].subset: no subset named {sname!r} "
                        f"(subsets: {known})"
                    )
                key = f"{rname}\0{sname}"
                d = dest_by_subset.get(key)
                if d is None:
                    d = dest_by_subset[key] = Destination(rname, sname, eps, target(eps))
                weights.append(int(sp.weight))
                dests.append(d)
            if sum(w for w in weights if w > 0) <= 0:
                raise ValueError(f"routes[{i}].split: weights must add up to more than 0")
            compiled.append(_Route(rname, headers, prefix, weights, dests))
        self._routes = tuple(compiled)

    def resolve(
        self,
        method: str,
        path: str,
        headers_lookup: Callable[[str], str | None],
        rng: random.Random,
    ) -> Destination:
        """The destination of one request (``method`` is accepted for future matchers)."""
        for r in self._routes:
            if r.prefix is not None and not path.startswith(r.prefix):
                continue
            for name, value in r.headers:
                if headers_lookup(name) != value:
                    break
            else:
                if r.single is not None:
                    return r.single
                i = bisect_right(r.cum, rng.random() * r.total)
                return r.dests[i if i < len(r.dests) else -1]
        return self.default

    def route(
        self,
        method: str,
        path: str,
        headers_lookup: Callable[[str], str | None],
        rng: random.Random,
    ) -> tuple[Endpoint, ...]:
        """The candidate endpoints of one request (see :meth:`resolve`)."""
        return self.resolve(method, path, headers_lookup, rng).endpoints


NO_FAULT: tuple[float, None] = (0.0, None)


class FaultInjector:
    """Fault injection decisions from ``policy.fault`` (Envoy HTTP fault filter).

    ``decide(rng)`` returns ``(delay_s, abort_http_status or None)``; ``decide_grpc(rng)``
    returns ``(delay_s, abort_grpc_status_name or None)``. ``active`` is ``False`` when no
    fault is configured, so drivers can skip the call entirely.
    """

    __slots__ = ("delay_percent", "delay_s", "abort_percent", "http_status", "grpc_status",
                 "active")

    def __init__(self, fault: Any) -> None:
        delay = getattr(fault, "delay", None)
        abort = getattr(fault, "abort", None)
        self.delay_percent = float(delay.percent) if delay is not None else 0.0
        self.delay_s = float(delay.duration) if delay is not None else 0.0
        self.abort_percent = float(abort.percent) if abort is not None else 0.0
        self.http_status: int = int(abort.http_status) if abort is not None else 503
        self.grpc_status: str = str(abort.grpc_status) if abort is not None else "unavailable"
        if self.delay_s <= 0:
            self.delay_percent = 0.0
        self.active = self.delay_percent > 0 or self.abort_percent > 0

    def _draw(self, rng: random.Random) -> tuple[float, bool]:
        delay = 0.0
        if self.delay_percent > 0 and rng.random() * 100.0 < self.delay_percent:
            delay = self.delay_s
        abort = self.abort_percent > 0 and rng.random() * 100.0 < self.abort_percent
        return delay, abort

    def decide(self, rng: random.Random) -> tuple[float, int | None]:
        if not self.active:
            return NO_FAULT
        delay, abort = self._draw(rng)
        return delay, (self.http_status if abort else None)

    def decide_grpc(self, rng: random.Random) -> tuple[float, str | None]:
        if not self.active:
            return NO_FAULT
        delay, abort = self._draw(rng)
        return delay, (self.grpc_status if abort else None)
