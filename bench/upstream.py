"""A local HTTP upstream for benchmarks: nginx when installed, else a small asyncio server.

nginx (Debian ``nginx-light``) answers a fixed body far faster than any Python server, so
the client's own cost dominates the measurement, which is what the benchmarks compare.
The fallback is a minimal keep-alive HTTP/1.1 responder in a separate process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"upstream on port {port} did not start")


class Upstream:
    def __init__(self) -> None:
        self.port = _free_port()
        self.kind = "nginx" if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx") else "python"
        self._dir = tempfile.mkdtemp(prefix="meshlib-bench-")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Upstream:
        if self.kind == "nginx":
            conf = os.path.join(self._dir, "nginx.conf")
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
            self._proc = subprocess.Popen([exe, "-c", conf, "-p", self._dir],
                                          stderr=subprocess.DEVNULL)
        else:
            self._proc = subprocess.Popen([sys.executable, "-c", _FALLBACK, str(self.port)])
        _wait(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)
