"""grpc-timeout encode/decode and Deadline arithmetic."""

from __future__ import annotations

import random

import pytest

from meshlib.core.deadline import (
    GRPC_TIMEOUT_HEADER,
    HTTP_TIMEOUT_HEADER,
    Deadline,
    decode_timeout,
    encode_timeout,
    parse_timeout,
)


@pytest.mark.parametrize(
    ("seconds", "wire"),
    [
        (1e-9, "1n"),
        (0.0000001, "100n"),
        (0.099999999, "99999999n"),  # 8 digits of nanoseconds still fit
        (0.1, "100000u"),  # 100000000n would be 9 digits
        (0.25, "250000u"),
        (1.5, "1500000u"),
        (99.999999, "99999999u"),
        (100, "100000m"),
        (3600, "3600000m"),
        (1e6, "1000000S"),
        (1e9, "16666667M"),  # rounded up, never shorter
        (1e12, "99999999H"),  # clamped
        (0, "1n"),
        (-5, "1n"),
        (1.0000000001, "1000001u"),  # rounds up to the next representable unit
    ],
)
def test_encode_timeout_table(seconds, wire):
    assert encode_timeout(seconds) == wire


@pytest.mark.parametrize(
    ("wire", "seconds"),
    [
        ("1n", 1e-9),
        ("250000u", 0.25),
        ("100m", 0.1),
        ("15S", 15.0),
        ("2M", 120.0),
        ("1H", 3600.0),
        ("99999999H", 99999999 * 3600.0),
        (" 5S ", 5.0),
        ("0m", 0.0),
    ],
)
def test_decode_timeout_table(wire, seconds):
    assert decode_timeout(wire) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad",
    ["", "S", "10", "123456789S", "1.5S", "-1S", "10s", "10 S", "10x", "1e3m", "10SS"],
)
def test_decode_rejects_invalid_and_parse_reports(bad):
    with pytest.raises(ValueError, match="invalid timeout"):
        decode_timeout(bad)
    value, reason = parse_timeout(bad)
    assert value is None
    assert reason and repr(bad) in reason


def test_parse_timeout_absent_bytes_and_non_ascii():
    assert parse_timeout(None) == (None, None)
    assert parse_timeout(b"100m") == (pytest.approx(0.1), None)
    value, reason = parse_timeout("1\u00e9S".encode())
    assert value is None and "ASCII" in reason


def test_round_trip_never_shortens_and_stays_close():
    rng = random.Random(7)
    for _ in range(2000):
        seconds = 10 ** rng.uniform(-8, 7)
        wire = encode_timeout(seconds)
        assert len(wire) <= 9 and wire[:-1].isdigit()
        back = decode_timeout(wire)
        assert back >= seconds - 1e-12
        # at least 100000 units after a unit change (e.g. 100 s = 100000m): within 1e-5
        assert back <= seconds * (1 + 1e-5) + 1e-9


def test_header_names():
    assert GRPC_TIMEOUT_HEADER == "grpc-timeout"
    assert HTTP_TIMEOUT_HEADER == "x-mesh-timeout"


@pytest.mark.parametrize(
    ("timeout", "now", "per_try", "remaining", "expired", "attempt"),
    [
        (None, 5.0, None, None, False, None),
        (None, 5.0, 2.0, None, False, 2.0),
        (10.0, 0.0, None, 10.0, False, 10.0),
        (10.0, 0.0, 2.0, 10.0, False, 2.0),
        (10.0, 9.0, 2.0, 1.0, False, 1.0),  # per-try capped by the overall deadline
        (10.0, 10.0, 2.0, 0.0, True, 0.0),
        (10.0, 12.0, 2.0, -2.0, True, -2.0),
    ],
)
def test_deadline_arithmetic(timeout, now, per_try, remaining, expired, attempt):
    d = Deadline.after(timeout, 0.0)
    assert d.remaining(now) == remaining
    assert d.expired(now) is expired
    assert d.per_try(now, per_try) == attempt


def test_deadline_earliest_and_encode():
    a, b, none = Deadline(5.0), Deadline(3.0), Deadline(None)
    assert a.earliest(b) is b and b.earliest(a) is b
    assert a.earliest(none) is a and none.earliest(a) is a
    assert none.encode(0.0) is None
    assert a.encode(4.75) == "250000u"
