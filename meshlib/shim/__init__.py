"""The sidecar shim: the mesh for services in any language (see docs/shim.md)."""
