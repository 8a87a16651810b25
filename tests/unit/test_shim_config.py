"""The shim's option table: every option is in ``--help`` and in docs/shim.md, and values
from flags, environment and file are parsed, layered and refused with the source named."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlib.shim.config import OPTIONS, ConfigError, build_parser, load_config
from meshlib.shim.safety import Refusal, check_destination, split_authority, strip_hop_by_hop

DOC = (Path(__file__).resolve().parents[2] / "docs" / "shim.md").read_text()


def test_every_option_is_in_help_and_docs():
    help_text = build_parser().format_help()
    for opt in OPTIONS:
        assert opt.flag in help_text and opt.env in help_text, opt.flag
        assert f"`{opt.flag} " in DOC and f"`{opt.env}`" in DOC, opt.flag


def test_layering_flags_over_env_over_defaults():
    cfg, _ = load_config(["--port", "16001"], {"MESHLIB_SHIM_PORT": "17001",
                                               "MESHLIB_SHIM_ADMIN_PORT": "17000",
                                               "MESHLIB_SHIM_RETRY_BODY_BYTES": "128K",
                                               "MESHLIB_SHIM_DRAIN_SECONDS": "1500ms"})
    assert (cfg.port, cfg.admin_port, cfg.retry_body_bytes, cfg.drain_seconds) == (
        16001, 17000, 128 * 1024, 1.5)
    assert cfg.bind == "127.0.0.1"  # loopback unless told otherwise
    assert cfg.own_ports() == frozenset({16001, 17000})


@pytest.mark.parametrize("argv, message", [
    (["--bind", "example.com"], "--bind: bad value 'example.com': must be an IP address"),
    (["--labels", "novalue"], "--labels: bad value 'novalue': label 'novalue' is not KEY=VALUE"),
    (["--max-head-bytes", "100"], "--max-head-bytes: bad value 100: must be >= 1K"),
    (["--service", "Bad_Name"], "--service: bad value 'Bad_Name'"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv, {})
    assert message in str(err.value)


def test_authority_and_destination_rules():
    assert split_authority(b"Orders:8080") == ("orders", 8080)
    assert split_authority(b"[::1]:80") == ("::1", 80)
    assert check_destination("orders", None, frozenset({15001})) == "orders"
    assert check_destination("orders.mesh", None, frozenset(), ("mesh",)) == "orders"
    with pytest.raises(Refusal, match="not a mesh service"):
        check_destination("orders.mesh", None, frozenset())
    for host, port, code in [("10.1.2.3", None, "ip_literal"), ("::1", None, "ip_literal"),
                             ("0x7f000001", None, "ip_literal"), ("a.b", None,
                             "not_mesh_service"), ("orders", 15001, "own_port"),
                             ("", None, "no_host")]:
        with pytest.raises(Refusal) as err:
            check_destination(host, port, frozenset({15001}))
        assert err.value.code == code, host
    with pytest.raises(Refusal):
        split_authority(b"orders:99999")


def test_hop_by_hop_fields_and_the_ones_connection_names():
    headers = [(b"Connection", b"close, X-Secret"), (b"X-Secret", b"1"), (b"TE", b"trailers"),
               (b"Keep-Alive", b"5"), (b"X-Keep", b"y"), (b"Upgrade", b"websocket")]
    assert strip_hop_by_hop(headers) == [(b"X-Keep", b"y")]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [
        (b"X-Keep", b"y"), (b"Upgrade", b"websocket"), (b"Connection", b"upgrade")]
