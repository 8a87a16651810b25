"""What ``/ready`` says about a process's certificate (the shim's admin port uses it).

Not ready when there is no certificate yet, when it has expired, or when less than
``close_fraction`` (10 %) of its lifetime is left: renewal is due at half life, so reaching the
last tenth means renewals have failed for 40 % of a lifetime, and peers will soon refuse the
certificate. The message carries the time left and the last renewal error.
"""

from __future__ import annotations

from typing import Any

from meshlib.identity.source import IdentityUnavailable
from meshlib.identity.x509util import CLOCK_SKEW


def identity_problems(source: Any, *, close_fraction: float = 0.1) -> list[str]:
    """Reasons (possibly none) the identity keeps a process from being ready."""
    if source is None:
        return []
    try:
        creds = source.current()
    except IdentityUnavailable as e:
        return [f"identity: {e}"]
    left = creds.seconds_until_expiry()
    lifetime = (creds.not_after - creds.not_before).total_seconds()
    if lifetime > CLOCK_SKEW.total_seconds():  # our leaves are backdated by CLOCK_SKEW
        lifetime -= CLOCK_SKEW.total_seconds()
    last_error = getattr(source, "last_error", None)
    why = f" (last renewal error: {last_error})" if last_error else ""
    if left <= 0:
        return [f"identity: certificate for {creds.spiffe_id} expired {-left:.0f}s ago{why}"]
    if left < lifetime * close_fraction:
        return [f"identity: certificate for {creds.spiffe_id} expires in {left:.0f}s{why}"]
    return []
