"""Errors of the etcd test helpers."""

from __future__ import annotations

import subprocess


class EtcdError(RuntimeError):
    """etcd could not be started, stopped or asked something; the message says which and why."""


class EtcdNotFound(EtcdError, FileNotFoundError):
    """The etcd (or etcdctl) binary is not installed where meshlib looks for it."""


class EtcdctlError(subprocess.CalledProcessError):
    """``etcdctl`` exited non-zero; ``str()`` includes its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() or (self.stdout or "").strip()
        return f"{super().__str__()}: {err}"

