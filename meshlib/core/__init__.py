"""Pure decision code: no sockets, threads, event loops, httpx or grpc imports.

Every module here takes its clock and random source as arguments so that it can be
tested by tables. Drivers (``meshlib.http``, ``meshlib.grpc``, the shim) act on the
decisions made here.
"""
