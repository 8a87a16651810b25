"""``meshctl ca init``: create the mesh CA directory (a new root, or an existing intermediate).

The CA key is written to a file (mode 0600) and nowhere else: it never goes to etcd. The
directory is what ``meshlib signer --ca-dir`` loads; its layout is in
:mod:`meshlib.identity.authority` and docs/security.md.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from meshlib.cli.base import EXIT_OK, EXIT_USAGE, CliError, Context


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"{what} {path!r}: {e.strerror}", EXIT_USAGE) from None


def cmd_ca_init(ctx: Context) -> int:
    from meshlib.identity.authority import CAFilesError, init_ca_dir
    from meshlib.identity.spiffe import SpiffeIdError, resolve_trust_domain

    a = ctx.args
    if a.days <= 0:
        raise CliError(f"--days must be > 0, got {a.days}", EXIT_USAGE)
    given = [a.intermediate_cert, a.intermediate_key, a.root]
    if any(given) and not all(given):
        raise CliError(
            "an existing intermediate needs all of --intermediate-cert, --intermediate-key and "
            "--root (the root bundle that signed it)", EXIT_USAGE,
        )
    try:
        td = resolve_trust_domain(a.trust_domain)
        d = init_ca_dir(
            a.dir, td,
            lifetime=dt.timedelta(days=a.days),
            intermediate_cert=_read(a.intermediate_cert, "--intermediate-cert"),
            intermediate_key=_read(a.intermediate_key, "--intermediate-key"),
            root_bundle=_read(a.root, "--root"),
            also_trust=_read(a.also_trust, "--also-trust"),
        )
    except (CAFilesError, SpiffeIdError, ValueError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    kind = "intermediate" if a.intermediate_cert else "root"
    ctx.print(f"CA ({kind}) for trust domain {td} in {d}: ca.key (keep it secret), ca.crt, "
              f"chain.pem, bundle.pem")
    ctx.print(f"next: meshlib signer --ca-dir {d}")
    return EXIT_OK


def add_ca_commands(sub: Any) -> None:
    p = sub.add_parser("ca", help="the mesh certificate authority: ca init")
    ca_sub = p.add_subparsers(dest="ca_command", metavar="CA_COMMAND", required=True)
    init = ca_sub.add_parser(
        "init", help="create a CA directory: a new root key and certificate, or an existing "
        "intermediate (the key stays in the directory, never in etcd)",
    )
    init.add_argument("--dir", required=True, help="directory to create the CA files in")
    init.add_argument("--trust-domain", default=None,
                      help="SPIFFE trust domain (env MESHLIB_TRUST_DOMAIN, default meshlib.local)")
    init.add_argument("--days", type=int, default=365, help="root lifetime in days (default 365)")
    init.add_argument("--intermediate-cert", help="PEM of an existing intermediate (then its chain)")
    init.add_argument("--intermediate-key", help="PEM private key of that intermediate")
    init.add_argument("--root", help="PEM root certificate(s) the intermediate chains to")
    init.add_argument("--also-trust", help="PEM roots to add to the bundle (the old root during "
                      "a CA rotation)")
    init.set_defaults(func=cmd_ca_init, needs_etcd=False)
