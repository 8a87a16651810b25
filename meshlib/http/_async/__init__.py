"""The HTTP driver: connection pool (``pool``) and httpx transport (``transport``).

The modules in ``meshlib/http/_async/`` are the source; those in ``meshlib/http/_sync/`` are
generated from them by ``scripts/unasync.py`` (edit the source, then run it). The I/O that
differs between the two lives by hand in ``meshlib/http/backends/``.
"""
