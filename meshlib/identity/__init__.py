"""Service identity for meshlib: SPIFFE X.509-SVIDs issued by a mesh CA through etcd.

The data plane (TLS in the HTTP/gRPC clients, servers and shim) reads the current credentials
from an :class:`~meshlib.identity.source.IdentitySource` and subscribes to rotations; where the
credentials come from (a static set for tests, etcd and the signer in production) is behind that
one interface. See docs/security.md.
"""

from meshlib.identity.source import Credentials, IdentitySource, StaticIdentitySource

__all__ = ["Credentials", "IdentitySource", "StaticIdentitySource"]
