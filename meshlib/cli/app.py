"""``main()``: the entry point of the ``meshctl`` and ``meshlib`` scripts.

Parses the command line (:func:`~meshlib.cli.parser.build_parser`), builds the
:class:`~meshlib.cli.base.Context` and runs the chosen handler. Expected failures print one
``prog: error: ...`` line on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from meshlib.cli.base import EXIT_OK, EXIT_USAGE, CliError, Context, etcd_errors
from meshlib.cli.parser import build_parser
from meshlib.discovery.keys import InvalidName, KeyLayout


def _prog_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "meshlib" if name == "meshlib" else "meshctl"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``meshctl`` and ``meshlib`` scripts; returns the exit code."""
    prog = _prog_name()
    parser = build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    if not logging.getLogger().handlers:  # library warnings (etcd lost, ...) as one-liners
        logging.basicConfig(level=os.environ.get("MESHLIB_LOG", "WARNING").upper(),
                            format=f"{prog}: %(levelname)s: %(message)s")
    endpoints = [e.strip() for e in str(args.etcd).split(",") if e.strip()]
    if getattr(args, "needs_etcd", True) and not endpoints:
        parser.error("--etcd: no endpoints given")
    ctx = Context(args=args, layout=KeyLayout(args.prefix), endpoints=endpoints,
                  timeout=args.timeout, prog=prog, out=sys.stdout, err=sys.stderr)
    try:
        with etcd_errors(ctx):
            return int(args.func(ctx))
    except CliError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return exc.code
    except InvalidName as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()
