"""The shim's hot-path shortcut for mesh mTLS (``OutboundProxy._call``) held to the one rule,
``meshlib.http.mtls.tls_target``: when the shortcut skips the decision (no identity and the
destination is not strict), the rule would also have answered "clear text"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshlib.core.endpoints import Endpoint
from meshlib.core.mtls import MODES, STRICT
from meshlib.http.mtls import tls_target


def _route(mode: str) -> SimpleNamespace:
    plan = SimpleNamespace(policy=SimpleNamespace(mtls=SimpleNamespace(mode=mode)))
    return SimpleNamespace(service="orders", dest=SimpleNamespace(plan=lambda: plan))


def _shortcut_skips(have_identity: bool, mode: str) -> bool:
    """The condition in ``OutboundProxy._call`` under which ``tls_of`` is None."""
    return not (have_identity or mode == STRICT)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ep_tls", [False, True])
def test_shortcut_skips_only_what_the_rule_sends_in_clear_text(mode: str, ep_tls: bool) -> None:
    ep = Endpoint(service="orders", instance_id="i1", address="127.0.0.1", port=1, tls=ep_tls)
    if _shortcut_skips(False, mode):
        assert tls_target(None, _route(mode), ep) is None


def test_shortcut_matches_the_outbound_source() -> None:
    """The condition above is the one in outbound.py (a copy would drift)."""
    import inspect

    from meshlib.shim import outbound

    src = inspect.getsource(outbound.OutboundProxy._call)
    assert "self.tls is not None or plan.policy.mtls.mode == STRICT" in src
