"""Regenerate meshtest_pb2.py / meshtest_pb2_grpc.py from meshtest.proto (needs grpcio-tools).

    python tests/grpc_proto/regenerate.py

The generated modules use a package-relative import fix-up so they import as
``tests.grpc_proto.meshtest_pb2`` as well as from this directory on sys.path.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent


def main() -> int:
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"--python_out={HERE}",
        f"--grpc_python_out={HERE}",
        str(HERE / "meshtest.proto"),
    ])
    if rc != 0:
        return rc
    grpc_file = HERE / "meshtest_pb2_grpc.py"
    text = grpc_file.read_text()
    # protoc emits "import meshtest_pb2"; make it package-relative.
    text = text.replace("import meshtest_pb2 as meshtest__pb2",
                        "from . import meshtest_pb2 as meshtest__pb2")
    grpc_file.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
