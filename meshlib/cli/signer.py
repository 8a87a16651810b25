"""``meshlib signer``: sign the mesh's certificate requests found in etcd (run one or more).

Loads the CA directory made by ``meshctl ca init``, joins the signer election and, while active,
answers requests under ``{prefix}/identity/csr/`` (see :mod:`meshlib.identity.signer`). Runs until
Ctrl-C or SIGTERM, then gives up the election so a standby takes over at once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from meshlib.cli.base import EXIT_OK, EXIT_USAGE, CliError, Context, Stopper


def cmd_signer(ctx: Context) -> int:
    from meshlib.identity.authority import Authority, CAFilesError
    from meshlib.identity.ratelimit import RateLimiter
    from meshlib.identity.signer import Signer
    from meshlib.identity.spiffe import SpiffeIdError

    a = ctx.args
    if a.lifetime < 10:
        raise CliError(f"--lifetime must be at least 10 seconds, got {a.lifetime}", EXIT_USAGE)
    try:
        authority = Authority.load(a.ca_dir, a.trust_domain)
        limiter = RateLimiter(a.rate_per_minute, a.burst)
    except (CAFilesError, SpiffeIdError, ValueError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    ctx.client.get(ctx.layout.prefix + "/identity/bundle")  # fail fast (exit 1) when etcd is down
    signer = Signer(
        ctx.client, authority, prefix=ctx.layout.prefix,
        lifetime=dt.timedelta(seconds=a.lifetime), limiter=limiter, lease_ttl=a.lease_ttl,
        name=a.name,
    )
    ctx.print(f"signer {signer.name}: trust domain {authority.trust_domain}, certificates for "
              f"{a.lifetime:g}s; waiting to become the active signer")
    try:
        with Stopper() as stopper:
            if signer.wait_active(2.0):
                ctx.print(f"signer {signer.name} is active")
            stopper.wait()
    finally:
        signer.close()
    return EXIT_OK


def add_signer_command(sub: Any) -> None:
    p = sub.add_parser("signer", help="sign certificate requests from etcd with the mesh CA "
                       "(several may run; one is active)")
    p.add_argument("--ca-dir", required=True, help="CA directory made by 'meshctl ca init'")
    p.add_argument("--trust-domain", default=None,
                   help="trust domain (default: the CA directory's)")
    p.add_argument("--lifetime", type=float, default=86400.0,
                   help="certificate lifetime in seconds (default 86400 = 24 h, as Linkerd)")
    p.add_argument("--rate-per-minute", type=float, default=60.0,
                   help="requests a minute per service (default 60)")
    p.add_argument("--burst", type=int, default=20, help="rate-limit burst per service (default 20)")
    p.add_argument("--lease-ttl", type=int, default=10,
                   help="election lease TTL in seconds: how soon a standby takes over (default 10)")
    p.add_argument("--name", default=None, help="this signer's name in the election")
    p.set_defaults(func=cmd_signer, needs_etcd=True)
