"""``meshctl``: the operator command line for the data meshlib keeps in etcd.

Everything meshlib knows lives in etcd under one prefix (see :mod:`meshlib.discovery.keys`),
so the CLI is a thin, honest view of those keys. One module per concern:

* :mod:`~meshlib.cli.base`: exit codes, :class:`CliError`, the per-run :class:`Context`
  (options, key layout, output streams, lazy etcd client), shared argument types.
* :mod:`~meshlib.cli.output`: tables, JSON, validation errors as lines or objects.
* :mod:`~meshlib.cli.registry`: ``services``, ``endpoints``, ``register``, ``deregister``.
* :mod:`~meshlib.cli.policy`: ``policy get|set|validate|delete`` (validated before writing).
* :mod:`~meshlib.cli.watch`: ``watch`` (one line or JSON object per change, none lost).
* :mod:`~meshlib.cli.demo`: ``demo`` (arguments passed through to :mod:`meshlib.demo`).
* :mod:`~meshlib.cli.parser`: global options and :data:`~meshlib.cli.parser.SUBCOMMANDS`,
  the list of subcommand builders; :mod:`~meshlib.cli.app`: :func:`main`.

Adding a subcommand: write ``meshlib/cli/<name>.py`` with a handler ``cmd_<name>(ctx:
Context) -> int`` and a builder ``add_<name>_command(sub)`` that calls
``sub.add_parser(...)``, ``output_option(p)`` if it prints, and ``p.set_defaults(
func=cmd_<name>, needs_etcd=True|False)``; then append the builder to ``SUBCOMMANDS`` in
:mod:`meshlib.cli.parser`. The global ``--etcd/--prefix/--timeout`` options are accepted after
it automatically; raise :class:`CliError` for expected failures (one line on stderr, exit 1,
or 2 with ``EXIT_USAGE``). Document it in docs/meshctl.md and the README's meshctl list (a
test checks the list).

Exit codes: 0 success, 1 runtime failure (etcd unreachable, key absent), 2 usage or
validation error (argparse also uses 2).
"""

from meshlib.cli.app import main
from meshlib.cli.base import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, CliError, Context
from meshlib.cli.parser import SUBCOMMANDS, build_parser

__all__ = [
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "SUBCOMMANDS",
    "CliError",
    "Context",
    "build_parser",
    "main",
]
