"""``meshlib demo``: runs :mod:`meshlib.demo`, passing every later argument through."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from meshlib.cli.base import EXIT_OK, EXIT_USAGE, CliError, Context


def cmd_demo(ctx: Context) -> int:

    demo_main: Callable[..., Any] = importlib.import_module("meshlib.demo").main
    argv = list(ctx.args.extra_args or [])
    if inspect.signature(demo_main).parameters:
        rc = demo_main(argv)
    elif argv:
        raise CliError(f"demo takes no arguments (got {' '.join(argv)})", EXIT_USAGE)
    else:
        rc = demo_main()
    return rc if isinstance(rc, int) else EXIT_OK


def add_demo_command(sub: Any) -> None:
    # No options of its own (not even -h): everything after ``demo`` goes to meshlib.demo.
    p = sub.add_parser("demo", help="run the meshlib demo (options: meshlib demo --help)",
                       add_help=False)
    p.set_defaults(func=cmd_demo, needs_etcd=False, passthrough=True)


