"""The ``meshctl`` argument parser: global options and the registry of subcommands.

Each subcommand module exposes builder functions ``add_*(sub)`` that add its parsers to the
argparse subparsers action ``sub`` and bind the handler with ``set_defaults(func=cmd_x,
needs_etcd=...)``; a handler takes the :class:`~meshlib.cli.base.Context` and returns the exit
code. :data:`SUBCOMMANDS` lists the builders in help order. To add a subcommand (``meshlib
shim``), write its module and append its builder to :data:`SUBCOMMANDS` below. A parser that sets
``passthrough=True`` receives unparsed arguments in ``ctx.args.extra_args`` and does not get the
global ``--etcd/--prefix/--timeout`` copies.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from meshlib.cli import ca, demo, policy, registry, shim, signer, watch
from meshlib.cli.base import DEFAULT_ENDPOINTS, ENV_ENDPOINTS, ENV_PREFIX
from meshlib.discovery.keys import DEFAULT_PREFIX

#: Subcommand builders, in help order. Each takes the argparse subparsers action and adds its
#: parsers there. A new subcommand appends its builder here (one import, one line).
SUBCOMMANDS: list[Callable[[Any], None]] = [
    registry.add_listing_commands,
    policy.add_policy_commands,
    registry.add_registration_commands,
    watch.add_watch_command,
    demo.add_demo_command,
    shim.add_shim_commands,
    ca.add_ca_commands,
    signer.add_signer_command,
]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def build_parser(prog: str = "meshctl") -> argparse.ArgumentParser:
    """The full parser: global options, then every builder of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Operate meshlib's service registry and policies in etcd.",
        epilog="Exit codes: 0 ok, 1 runtime or etcd error, 2 usage or validation error.",
    )
    parser.add_argument("--etcd", metavar="ENDPOINTS",
                        default=os.environ.get(ENV_ENDPOINTS) or DEFAULT_ENDPOINTS,
                        help=f"comma-separated host:port list (env {ENV_ENDPOINTS}, "
                             f"default {DEFAULT_ENDPOINTS})")
    parser.add_argument("--prefix", default=os.environ.get(ENV_PREFIX) or DEFAULT_PREFIX,
                        help=f"key prefix (env {ENV_PREFIX}, default {DEFAULT_PREFIX})")
    parser.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                        help="etcd request timeout (default 5)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    _accept_globals_everywhere(parser)
    return parser


def _accept_globals_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--etcd/--prefix/--timeout`` also follow the subcommand (``meshctl services
    --etcd X``). Subparser copies default to SUPPRESS so they never mask the global value."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in set(action.choices.values()):
            if child.get_default("passthrough"):
                continue  # its arguments belong to another program (``demo``)
            have = {s for a in child._actions for s in a.option_strings}
            if "--etcd" not in have:
                child.add_argument("--etcd", metavar="ENDPOINTS", default=argparse.SUPPRESS,
                                   help=argparse.SUPPRESS)
                child.add_argument("--prefix", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                child.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            _accept_globals_everywhere(child)


