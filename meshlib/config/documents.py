"""Policy documents: YAML or JSON text in, a raw mapping out, and the default/service merge.

Nothing here knows the schema (:mod:`meshlib.config.policy` validates); this module only
decodes what operators write into etcd and combines the two documents that make a service's
effective policy:

* :func:`load_policy_document`: UTF-8 text, JSON first (what tools write) then YAML (what
  people write, with PyYAML's ``SafeLoader``), duplicate keys refused in both, syntax errors
  reported with the offending line; an empty document is ``{}``.
* :func:`merge_policy_dicts`: the service document deep-merged over the default document
  (mappings merge key by key, lists, scalars and explicit ``null`` replace).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from meshlib.config.errors import ConfigError, FieldError, PolicyError

__all__ = ["decode_text", "kind_of", "load_policy_document", "merge_policy_dicts"]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: the base constructor reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _load_document(text: str, key: str) -> Any:
    """JSON first (it is what tools write), then YAML (what people write)."""
    try:
        return json.loads(text, object_pairs_hook=_json_pairs)
    except ValueError as json_exc:
        try:
            return yaml.load(text, Loader=_StrictLoader)  # _StrictLoader is a SafeLoader
        except yaml.YAMLError as yaml_exc:
            looks_json = text.lstrip()[:1] in ("{", "[") and '"' in text
            if looks_json and isinstance(json_exc, json.JSONDecodeError):
                line = text.splitlines()[json_exc.lineno - 1] if text.splitlines() else ""
                raise PolicyError(key, [FieldError(
                    "", line.strip(), f"JSON syntax error: {json_exc}"
                )]) from None
            line, reason = _describe_yaml_error(yaml_exc, text)
            raise PolicyError(key, [FieldError("", line, f"YAML syntax error: {reason}")]) from None


def _describe_yaml_error(exc: yaml.YAMLError, text: str) -> tuple[str, str]:
    """(offending line, "problem at line L, column C") without PyYAML's snippet art."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if mark is None:
        return "", " ".join(str(exc).split())
    lines = text.splitlines()
    line = lines[mark.line].strip() if 0 <= mark.line < len(lines) else ""
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    reason = f"{problem} at {where}" + (f" ({context})" if context else "")
    return line, reason


def decode_text(data: bytes | str, key: str, error: type[ConfigError]) -> str:
    """``data`` as text: bytes must be UTF-8, else ``error(key, ...)`` names the bytes around
    the first bad one (policy documents and instance records alike)."""
    if not isinstance(data, bytes | bytearray):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(key, [FieldError(
            "", bytes(data[max(0, exc.start - 10): exc.end + 10]),
            f"not UTF-8 text: {exc.reason} at byte {exc.start}",
        )]) from None


def load_policy_document(data: bytes | str, key: str) -> dict[str, Any]:
    """Decode a YAML or JSON policy document into its raw mapping, without validating the
    schema (``{}`` for an empty document). This is the input :func:`merge_policy_dicts`
    expects. Raises :class:`PolicyError` for bad UTF-8, a syntax error, a duplicate key or a
    top level that is not a mapping."""
    text = decode_text(data, key, PolicyError)
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        return {}
    raw = _load_document(text, key)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise PolicyError(key, [FieldError(
            "", raw, f"top level must be a mapping of policy fields, got {kind_of(raw)}"
        )])
    return dict(raw)


def kind_of(value: Any) -> str:
    """How an error message names the type of a decoded value ("a list", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def merge_policy_dicts(
    default_raw: Mapping[str, Any] | None, service_raw: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Deep-merge a service policy over the default policy (raw, unvalidated data).

    Mappings merge key by key, recursively; any other value in ``service_raw`` (lists,
    scalars and explicit ``null``) replaces the default's. Neither input is modified.

    >>> merge_policy_dicts({"retries": {"attempts": 2, "methods": ["GET"]}},
    ...                    {"retries": {"methods": ["PUT"]}})
    {'retries': {'attempts': 2, 'methods': ['PUT']}}
    """
    return _merge(default_raw or {}, service_raw or {})


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: _copy(v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = _copy(v)
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value
