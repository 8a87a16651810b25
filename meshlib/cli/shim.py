"""``meshlib shim`` and ``meshlib await``: the sidecar shim (docs/shim.md).

Both pass every later argument to :func:`meshlib.shim.main.main` (the shim has its own
flags, environment variables and ``--help``):

* ``meshlib shim [FLAGS]`` runs the shim;
* ``meshlib await [--admin-port N] [--wait-timeout S] -- CMD ARGS`` waits until the shim
  beside it answers ``/ready``, then runs ``CMD`` (linkerd-await): it is ``meshlib shim
  --wait``.
"""

from __future__ import annotations

from typing import Any

from meshlib.cli.base import Context


def cmd_shim(ctx: Context) -> int:
    from meshlib.shim.main import main

    return main(list(ctx.args.extra_args or []))


def cmd_await(ctx: Context) -> int:
    from meshlib.shim.main import main

    return main(["--wait", *(ctx.args.extra_args or [])])


def add_shim_commands(sub: Any) -> None:
    # No options of their own (not even -h): everything after the word goes to the shim.
    p = sub.add_parser("shim", help="run the sidecar shim beside a service in any language "
                       "(options: meshlib shim --help)", add_help=False)
    p.set_defaults(func=cmd_shim, needs_etcd=False, passthrough=True)
    p = sub.add_parser("await", help="wait until the shim is ready, then run a command: "
                       "meshlib await [--admin-port N] -- CMD ARGS", add_help=False)
    p.set_defaults(func=cmd_await, needs_etcd=False, passthrough=True)
