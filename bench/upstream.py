"""A local HTTP upstream for benchmarks: nginx when installed, else a small asyncio server.

nginx (Debian ``nginx-light``) answers a fixed body far faster than any Python server, so
the client's own cost dominates the measurement, which is what the benchmarks compare.
The fallback is a minimal keep-alive HTTP/1.1 responder in a separate process. The process
is started and reaped by ``meshlib.testing.process`` (own session, killed with the bench even
when the bench itself is SIGKILLed), its output goes to a log in its temp dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import harness  # noqa: F401 - puts the checkout's meshlib first on sys.path

from meshlib.testing.process import free_port, log_tail, make_temp_dir, reap, remove_temp_dir, spawn

_FALLBACK = textwrap.dedent(
    """
    import asyncio, sys
    BODY = b"ok"
    RESP = (b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\ncontent-type: text/plain\\r\\n\\r\\n" + BODY)
    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\\r\\n\\r\\n")
                writer.write(RESP)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
        async with srv:
            await srv.serve_forever()
    asyncio.run(main())
    """
)


def _wait(port: int, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"upstream on port {port} did not start; log {log}:\n{log_tail(log)}")


class Upstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.kind = "nginx" if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx") else "python"
        self._dir = make_temp_dir("meshlib-bench-")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Upstream:
        if self.kind == "nginx":
            conf = self._dir / "nginx.conf"
            with open(conf, "w") as fh:
                fh.write(textwrap.dedent(f"""
                    worker_processes 1;
                    daemon off;
                    pid {self._dir}/nginx.pid;
                    error_log {self._dir}/error.log;
                    events {{ worker_connections 4096; }}
                    http {{
                        access_log off;
                        keepalive_requests 1000000;
                        client_body_temp_path {self._dir};
                        server {{
                            listen 127.0.0.1:{self.port} backlog=1024;
                            location / {{ return 200 "ok"; }}
                        }}
                    }}
                """))
            exe = shutil.which("nginx") or "/usr/sbin/nginx"
            argv = [exe, "-c", str(conf), "-p", str(self._dir)]
        else:
            argv = [sys.executable, "-c", _FALLBACK, str(self.port)]
        log = self._dir / "upstream.log"
        self._proc = spawn(argv, log)
        _wait(self.port, log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            reap(self._proc, term_timeout=10)
        remove_temp_dir(self._dir)
