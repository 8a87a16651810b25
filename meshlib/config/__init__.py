"""Policy schema, parsing and validation."""
