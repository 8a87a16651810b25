"""What every ``meshctl`` command shares: exit codes, :class:`CliError`, the :class:`Context`
(parsed options, key layout, output streams, a lazily opened etcd client), the mapping of etcd
client errors to one-line CLI errors, argument types and the ``-o/--output`` option, and the
SIGTERM/Ctrl-C :class:`Stopper` of the long-running commands (``register``, ``watch``).

Exit codes follow the BSD ``sysexits`` spirit in two buckets: 0 success, 1 runtime failure
(etcd unreachable, key absent), 2 usage or validation error (argparse also uses 2).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from meshlib.cli.output import one_line
from meshlib.discovery.keys import InvalidName, KeyLayout, check_service_name

if TYPE_CHECKING:
    from meshlib.discovery.etcd_client import EtcdClient


ENV_ENDPOINTS = "MESHLIB_ETCD_ENDPOINTS"
ENV_PREFIX = "MESHLIB_PREFIX"
DEFAULT_ENDPOINTS = "127.0.0.1:2379"
DEFAULT_SERVICE = "_default"  # the pseudo service name of the default policy key

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: printed as one ``prog: error: message`` line, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every command needs: parsed options, key layout, output streams, a lazy client."""

    args: argparse.Namespace
    layout: KeyLayout
    endpoints: list[str]
    timeout: float
    prog: str
    out: IO[str]
    err: IO[str]
    _client: EtcdClient | None = None

    @property
    def client(self) -> EtcdClient:
        if self._client is None:
            from meshlib.discovery.etcd_client import EtcdClient

            try:
                self._client = EtcdClient(self.endpoints, timeout=self.timeout)
            except ValueError as exc:  # malformed endpoint list
                raise CliError(str(exc), EXIT_USAGE) from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def output(self) -> str:
        return getattr(self.args, "output", None) or "table"

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def warn(self, text: str) -> None:
        self.err.write(f"{self.prog}: {text}\n")
        self.err.flush()


@contextlib.contextmanager
def etcd_errors(ctx: Context) -> Iterator[None]:
    """Turn etcd client errors into one-line CLI errors."""
    from meshlib.discovery.etcd_client import EtcdError, EtcdUnavailable

    try:
        yield
    except EtcdUnavailable as exc:
        raise CliError(
            f"etcd unreachable at {','.join(ctx.endpoints)} ({one_line(str(exc))})"
        ) from None
    except EtcdError as exc:
        raise CliError(f"etcd request failed: {one_line(str(exc))}") from None


def service_arg(name: str) -> str:
    """argparse type for service names; ``_default`` is accepted where the default key fits."""
    if name == DEFAULT_SERVICE:
        return name
    try:
        return check_service_name(name)
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

class Stopper:
    """Waits until Ctrl-C or SIGTERM; restores the previous SIGTERM handler on exit."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def wait(self) -> None:
        try:
            while not self.event.wait(0.2):
                pass
        except KeyboardInterrupt:
            self.event.set()


def output_option(p: argparse.ArgumentParser, choices: Sequence[str] = ("table", "json")) -> None:
    p.add_argument("-o", "--output", choices=list(choices), default="table",
                   help="output format (default: table)")

