"""``no_propagate`` host patterns (``meshlib.config.propagation``), as a table."""

from __future__ import annotations

import pytest

from meshlib.config.propagation import PropagationPolicy


@pytest.mark.parametrize(("patterns", "host", "allowed"), [
    ([], "api.partner.com", True),
    (["*.partner.com"], "api.partner.com", False),
    (["*.partner.com"], "partner.com", True),
    (["API.Stripe.com."], "api.stripe.com", False),
    ("a.com, *.b.com", "x.b.com", False),
    (["*"], "billing.internal", False),
    (["10.0.0.?"], "10.0.0.7", False),
])
def test_allows(patterns: list[str] | str, host: str, allowed: bool) -> None:
    assert PropagationPolicy.parse(patterns).allows(host) is allowed


@pytest.mark.parametrize("bad", ["https://a.com", "a.com:443", "a.com/x", "a b"])
def test_bad_pattern_names_where_and_value(bad: str) -> None:
    with pytest.raises(ValueError, match=r"no_propagate\[0\]=.*not a host pattern"):
        PropagationPolicy.parse([bad])


def test_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLIB_NO_PROPAGATE", "*.partner.com")
    assert not PropagationPolicy.parse(None).allows("x.partner.com")
    monkeypatch.setenv("MESHLIB_NO_PROPAGATE", "bad/pattern")
    with pytest.raises(ValueError, match=r"MESHLIB_NO_PROPAGATE\[0\]='bad/pattern'"):
        PropagationPolicy.parse(None)
