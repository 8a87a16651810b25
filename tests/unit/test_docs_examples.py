"""Every instance record and policy document in the docs' examples passes the validators that
clients use, so an example cannot drift into one etcd would store but meshlib would refuse.

Examples are found in README.md and docs/*.md:

* ```` ```yaml ```` and ```` ```json ```` blocks: an instance record when the mapping has an
  ``address``, a policy document (``parse_policy``) when one of its top-level keys is a policy
  field; other blocks (a docker compose file, a Kubernetes pod, the snapshot file's format) are
  not meshlib documents and are not checked;
* ``etcdctl put KEY VALUE`` in shell blocks and ``x.etcdctl("put", KEY, VALUE)`` in Python
  blocks (VALUE a literal or a name assigned a literal in the block; ``{...}`` in an f-string
  key stands for the prefix): checked as what KEY holds in the key layout. Keys outside the
  layout (``/a``, ``/k``) are plain etcd examples and not checked.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import shlex
from dataclasses import dataclass

import pytest
import yaml

from meshlib.config import parse_instance_record, parse_policy
from meshlib.config.policy import Policy
from meshlib.discovery.keys import DEFAULT_PREFIX, KeyLayout

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAYOUT = KeyLayout(DEFAULT_PREFIX)
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Example:
    where: str  # path:line
    kind: str  # "record" or "policy"
    key: str
    value: str


def _blocks(path: pathlib.Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced code block."""
    out: list[tuple[str, int, str]] = []
    lang, start, lines = None, 0, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line.strip())
        if m and lang is None:
            lang, start, lines = m.group(1) or "text", n + 1, []
        elif line.strip() == "```" and lang is not None:
            out.append((lang, start, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return out


POLICY_FIELDS = frozenset(Policy.model_fields)


def _document_kind(doc: object) -> str | None:
    """"record", "policy", or None for a block that is neither (compose, Kubernetes...)."""
    if not isinstance(doc, dict):
        return None
    if "address" in doc:
        return "record"
    return "policy" if POLICY_FIELDS & set(doc) else None


def _classify(where: str, key: str, value: str) -> Example | None:
    parsed = LAYOUT.parse(key)
    if parsed is None:
        return None
    return Example(where, "record" if parsed[0] == "instance" else "policy", key, value)


def _python_puts(where: str, text: str, first_line: int) -> list[Example]:
    tree = ast.parse(text)
    names = {
        t.id: node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for t in node.targets
        if isinstance(t, ast.Name) and isinstance(node.value.value, str)
    }

    def literal(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return names.get(node.id)
        if isinstance(node, ast.JoinedStr):  # f"{etcd_prefix}/services/x/policy"
            return "".join(
                v.value if isinstance(v, ast.Constant) else DEFAULT_PREFIX for v in node.values
            )
        return None

    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "etcdctl" and len(node.args) >= 3
                and literal(node.args[0]) == "put"):
            key, value = literal(node.args[1]), literal(node.args[2])
            line = f"{where}:{first_line + node.lineno - 1}"
            assert key is not None and value is not None, f"{line}: put with a non-literal argument"
            ex = _classify(line, key, value)
            if ex is not None:
                out.append(ex)
    return out


def _shell_puts(where: str, text: str, first_line: int) -> list[Example]:
    out = []
    for i, line in enumerate(text.splitlines()):
        if "etcdctl put " not in line:
            continue
        words = shlex.split(line[line.index("etcdctl put "):], comments=True)
        args = [w for w in words[2:] if not w.startswith("--")]
        if len(args) < 2 or args[1].startswith("$("):
            continue  # the value comes from a file: nothing literal to check
        ex = _classify(f"{where}:{first_line + i}", args[0], args[1])
        if ex is not None:
            out.append(ex)
    return out


def collect() -> list[Example]:
    found: list[Example] = []
    for path in DOCS:
        where = str(path.relative_to(ROOT))
        for lang, line, text in _blocks(path):
            if lang in ("yaml", "json"):
                doc = json.loads(text) if lang == "json" else yaml.safe_load(text)
                kind = _document_kind(doc)
                if kind is None:
                    continue
                key = (LAYOUT.instance_key("example", "example-1") if kind == "record"
                       else LAYOUT.default_policy_key)
                found.append(Example(f"{where}:{line}", kind, key, text))
            elif lang in ("sh", "bash", "shell", "console"):
                found.extend(_shell_puts(where, text, line))
            elif lang == "python" and "etcdctl(" in text:  # others may be pseudo-code
                found.extend(_python_puts(where, text, line))
    return found


EXAMPLES = collect()


def test_the_docs_have_examples_of_both_kinds() -> None:
    # Guards the collector itself: a change that stops finding examples must not pass.
    wheres = {(e.where.split(":")[0], e.kind) for e in EXAMPLES}
    assert ("docs/testing.md", "record") in wheres
    assert ("docs/testing.md", "policy") in wheres
    assert ("docs/policy.md", "policy") in wheres
    assert ("docs/etcd-layout.md", "record") in wheres


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{e.where}-{e.kind}" for e in EXAMPLES])
def test_example_is_accepted_by_the_validators(example: Example) -> None:
    if example.kind == "record":
        parsed = LAYOUT.parse(example.key)
        assert parsed is not None and parsed[2] is not None
        parse_instance_record(example.key, example.value, service=parsed[1],
                              instance_id=parsed[2])
    else:
        parse_policy(example.value, example.key)


def test_only_meshlib_documents_are_collected() -> None:
    assert _document_kind({"address": "10.0.0.1", "port": 80}) == "record"
    assert _document_kind({"retries": 2}) == "policy"  # invalid, but a policy: it is checked
    assert _document_kind({"services": {"orders": {"image": "x"}}}) is None
    assert _document_kind({"spec": {}}) is None
    assert _document_kind(["a"]) is None


def test_the_collector_catches_the_old_invalid_examples(tmp_path: pathlib.Path) -> None:
    # The examples docs/testing.md had before they were checked: both must be refused.
    from meshlib.config import PolicyError, RecordError

    bad = _python_puts("old", '\n'.join([
        'etcd.etcdctl("put", "/meshlib/v1/services/orders/instances/a", \'{"host": "10.0.0.1"}\')',
        'etcd_server.etcdctl("put", f"{etcd_prefix}/defaults/policy", "retries: 2")',
    ]), 1)
    assert [e.kind for e in bad] == ["record", "policy"]
    with pytest.raises(RecordError, match="address"):
        test_example_is_accepted_by_the_validators(bad[0])
    with pytest.raises(PolicyError, match="retries"):
        test_example_is_accepted_by_the_validators(bad[1])


def test_readme_lists_every_meshctl_subcommand_and_links_existing_docs() -> None:
    import argparse

    from meshlib.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.split("\n- ") if ln.startswith("**`meshctl`**"))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [name for name in sub.choices if f"`{name}" not in line]
    assert not missing, f"README.md's meshctl list lacks {missing}: {line!r}"
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README.md links {link}, which does not exist"
