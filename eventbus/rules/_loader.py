"""Rule files in, plain rule documents with line numbers out: the first step of loading a rule set.

The rule compiler (``_ruleset``) turns these documents into a ``RuleSet``; this module only reads
YAML, so that every later error can name the file, the line of the offending key and the rule.

A rule file holds a YAML list of rule mappings (an empty file holds no rules). Settings and
connector files go through ``eventbus._yaml``; rule files need two things it does not do: every
problem of every file reported at once as ``RuleError``s, and a narrower YAML dialect, because
rules carry event-pattern values that must stay the strings the user typed:

* only ``true``/``false`` are booleans (``on``, ``off``, ``yes``, ``no`` stay strings);
* timestamps stay strings (an ISO date in a pattern compares against event strings);
* a key repeated in one mapping is an error instead of silently keeping the last value;
* every key is a string (``1: x`` is an error: quote the key).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eventbus._errors import RuleError

__all__ = ["KeyPath", "RuleDoc", "read_rule_files"]

KeyPath = tuple[str | int, ...]


class _RuleYamlLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no stubs
    """SafeLoader with YAML 1.2 booleans and no timestamps."""


# Copy the resolver table so that only this loader changes, not yaml.SafeLoader itself.
_RuleYamlLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RuleYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


@dataclass(frozen=True)
class RuleDoc:
    """One rule as written: its data, its file and the line of each key path inside it."""

    data: Any
    file: str
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line(self, loc: Sequence[str | int] = ()) -> int | None:
        """The line of ``loc`` or of its closest ancestor in the file (None for in-memory rules)."""
        path = tuple(loc)
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)


class _Builder:
    """Turns a composed YAML node tree into plain data and a line table, noting every problem."""

    def __init__(self, loader: _RuleYamlLoader) -> None:
        self.loader = loader
        self.problems: list[tuple[int, str]] = []
        self._open: set[int] = set()

    def build(self, node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> Any:
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self._open:
            self.problems.append((node.start_mark.line + 1, "an alias refers to itself"))
            return None
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node)
        if node.tag not in ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"):
            self.problems.append((node.start_mark.line + 1, f"unsupported YAML tag {node.tag}"))
            return None
        self._open.add(id(node))
        try:
            return self._build_collection(node, path, lines)
        finally:
            self._open.discard(id(node))

    def _build_collection(self, node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> Any:
        if isinstance(node, yaml.MappingNode):
            own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
            self.loader.flatten_mapping(node)
            # flatten_mapping puts the pairs merged in by `<<` first; own keys override them.
            merged = len(node.value) - own
            mapping: dict[str, Any] = {}
            from_merge: set[str] = set()
            for index, (key_node, value_node) in enumerate(node.value):
                line = key_node.start_mark.line + 1
                key = self.build(key_node, (*path, "<key>"), {})
                if not isinstance(key, str):
                    self.problems.append((line, f"key {key!r} must be a string (quote it)"))
                    continue
                if key in mapping and key not in from_merge:
                    if index >= merged:
                        first = lines[(*path, key)]
                        self.problems.append(
                            (line, f"duplicate key {key!r} (first at line {first})")
                        )
                    continue
                if index < merged:
                    from_merge.add(key)
                else:
                    from_merge.discard(key)
                lines[(*path, key)] = line
                mapping[key] = self.build(value_node, (*path, key), lines)
            return mapping
        return [self.build(item, (*path, i), lines) for i, item in enumerate(node.value)]


def _rule_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def _read_file(path: Path, errors: list[RuleError]) -> list[RuleDoc]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(RuleError(f"cannot read rule file: {exc}", file=name))
        return []
    loader = _RuleYamlLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return []
        if not isinstance(root, yaml.SequenceNode):
            errors.append(
                RuleError(
                    "a rule file holds a YAML list of rules (each item starts with '- name: ...')",
                    file=name,
                    line=root.start_mark.line + 1,
                )
            )
            return []
        builder = _Builder(loader)
        documents = []
        for item in root.value:
            lines: dict[KeyPath, int] = {}
            documents.append(RuleDoc(builder.build(item, (), lines), name, lines))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        problem = exc.problem or exc.context or "invalid YAML"
        errors.append(RuleError(f"invalid YAML: {problem}", file=name, line=line))
        return []
    except yaml.YAMLError as exc:
        errors.append(RuleError(f"invalid YAML: {exc}", file=name))
        return []
    finally:
        loader.dispose()
    errors.extend(RuleError(message, file=name, line=line) for line, message in builder.problems)
    return documents


def read_rule_files(path: str | Path) -> tuple[list[RuleDoc], list[RuleError]]:
    """Read one rule file, or every ``*.yaml``/``*.yml`` file of a directory in name order.

    Returns ``(documents, errors)``: every rule document in file order, and every file-level
    problem found (unreadable file, invalid YAML, duplicate or non-string keys, a file that is
    not a list). Never raises for bad input; a missing path is one error.
    """
    root = Path(path)
    if not root.exists():
        return [], [RuleError("no such rule file or directory", file=str(root))]
    errors: list[RuleError] = []
    documents = [doc for file in _rule_files(root) for doc in _read_file(file, errors)]
    return documents, errors
