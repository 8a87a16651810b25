"""Which non-mesh hosts receive the caller's trace context (``traceparent``, ``tracestate``,
``baggage``): the ``no_propagate`` knob of ``mesh.http_client()``.

Default: **propagate to every host**, as OpenTelemetry's own httpx instrumentation and a
sidecar's passthrough cluster do. Internal services outside the mesh (``billing.internal``,
a database's HTTP API) are the common case and a trace that stops at them is the complaint
this closes. Third parties that must not see internal trace ids or baggage are named by host
patterns; for them no trace header is added and any the application set itself is removed.
The call still gets its span and its ``http.client.request.duration`` series.

Patterns are shell globs over the lower-case host name (:func:`fnmatch.fnmatchcase`):
``api.partner.com``, ``*.partner.com`` (any subdomain; not ``partner.com`` itself), ``*``
(nothing leaves). They come from the ``no_propagate=[...]`` argument, else from the
environment variable ``MESHLIB_NO_PROPAGATE`` (comma-separated), so an operator can set them
for an application without a code change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Final

__all__ = ["ENV_NO_PROPAGATE", "PropagationPolicy"]

ENV_NO_PROPAGATE: Final = "MESHLIB_NO_PROPAGATE"

_PATTERN = re.compile(r"^[a-z0-9*?.\-\[\]]{1,253}$")


class PropagationPolicy:
    """``allows(host)``: whether trace context may go to ``host`` (lower-case, no port).

    >>> p = PropagationPolicy.parse(["*.partner.com"])
    >>> p.allows("api.partner.com"), p.allows("billing.internal")
    (False, True)
    """

    __slots__ = ("patterns",)

    def __init__(self, patterns: tuple[str, ...] = ()) -> None:
        self.patterns = patterns

    @classmethod
    def parse(cls, patterns: Iterable[str] | str | None,
              where: str = "no_propagate") -> PropagationPolicy:
        """Validate ``patterns`` (None: the environment variable, else propagate everywhere).

        Raises ValueError naming ``where``, the bad pattern and what is allowed."""
        if patterns is None:
            env = os.environ.get(ENV_NO_PROPAGATE, "")
            patterns, where = env, ENV_NO_PROPAGATE
        if isinstance(patterns, str):
            patterns = [p for p in patterns.split(",")]
        out = []
        for i, raw in enumerate(patterns):
            if not isinstance(raw, str):
                raise ValueError(f"{where}[{i}]={raw!r}: a host pattern must be a string "
                                 "such as '*.partner.com'")
            p = raw.strip().lower().rstrip(".")
            if not p:
                continue
            if not _PATTERN.match(p):
                raise ValueError(
                    f"{where}[{i}]={raw!r}: not a host pattern; use a host name with shell "
                    "wildcards (a-z 0-9 . - * ? [...]), e.g. 'api.partner.com' or "
                    "'*.partner.com', without scheme, port or path")
            out.append(p)
        return cls(tuple(out))

    def allows(self, host: str) -> bool:
        """True unless a pattern matches ``host`` (called once per host; callers cache)."""
        return not any(fnmatchcase(host, p) for p in self.patterns)

    def __repr__(self) -> str:
        return f"PropagationPolicy(no_propagate={list(self.patterns)!r})"
