"""Rule files in, plain rule documents with line numbers out: the first step of loading a rule set.

The rule compiler (``_ruleset``) turns these documents into a ``RuleSet``; this module only reads
YAML, so that every later error can name the file, the line of the offending key and the rule.

A rule file holds a YAML list of rule mappings (an empty file holds no rules). Rule files are
read with the same node builder as settings and connector files (``eventbus.config``), with two
differences: every problem of every file is reported at once as ``RuleError``s, and the YAML
dialect is narrower, because rules carry event-pattern values that must stay the strings the
user typed:

* only ``true``/``false`` (any of YAML 1.2's casings) are booleans (``on``, ``off``, ``yes``,
  ``no`` stay strings);
* timestamps stay strings (an ISO date in a pattern compares against event strings);
* a key repeated in one mapping is an error instead of silently keeping the last value;
* every key is a string (``1: x`` is an error: quote the key).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from eventbus._errors import RuleError
from eventbus.config import (
    KeyPath,
    NodeBuilder,
    YamlDoc,
    flow_too_deep,
    yaml_error_at,
    yaml_files,
)

__all__ = ["KeyPath", "ParsedFiles", "RuleDoc", "read_rule_files"]

RuleDoc = YamlDoc
"""One rule as written: its data, its file and the line of each key path inside it."""


# libyaml's parser when PyYAML was built with it (the wheels are): about ten times faster to read
# 10,000 rules; the constructors and resolvers stay PyYAML's own, so the values are the same.
_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _RuleYamlLoader(_Base):  # type: ignore[misc,valid-type]  # PyYAML has no stubs
    """SafeLoader with YAML 1.2 booleans, JSON's numbers and no timestamps."""


# Copy the resolver table so that only this loader changes, not yaml.SafeLoader itself. Of
# YAML 1.1's implicit types, booleans and numbers are narrowed to JSON's (what an EventBridge
# pattern pasted in means), and timestamps and "=" (YAML's value key) are not read at all.
_NARROWED = (
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:value",
)
_RuleYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NARROWED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RuleYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
# JSON's numbers: 12:30 (base 60 in YAML 1.1), 010 (octal), 0x1F, 1_000 and +1 stay strings;
# 1e3 is a number (a string in YAML 1.1)
_RuleYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^-?(?:0|[1-9][0-9]*)$"), list("-0123456789")
)
_RuleYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)$"),
    list("-0123456789"),
)


ParsedFiles = dict[str, tuple[str, list[RuleDoc]]]
"""Rule files read without a problem: by name, their text and the documents parsed from it."""


def _read_file(
    path: Path, errors: list[RuleError], previous: ParsedFiles, parsed: ParsedFiles
) -> list[RuleDoc]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(RuleError(f"cannot read rule file: {exc}", file=name))
        return []
    known = previous.get(name)
    if known is not None and known[0] == text:
        parsed[name] = known
        return known[1]
    found = len(errors)
    documents = _parse(name, text, errors)
    if len(errors) == found:
        parsed[name] = (text, documents)
    return documents


_RULE_START = re.compile(r"^-\s+name:\s*(['\"]?)([A-Za-z0-9._-]{1,128})\1\s*(?:#.*)?$")
_RULE_NAME = re.compile(r"^\s{1,8}name:\s*(['\"]?)([A-Za-z0-9._-]{1,128})\1\s*(?:#.*)?$")


def _rule_at(text: str, line: int) -> str | None:
    """The name of the rule a line of a file YAML cannot read is in, as far as the text shows
    (its item's ``name:``): the parser stopped before any rule was built."""
    lines = text.splitlines()[:line]
    for number in range(len(lines) - 1, -1, -1):
        current = lines[number]
        if (found := _RULE_START.match(current)) is not None:
            return found.group(2)
        if current.startswith("-"):
            # an item whose name comes on a later line, before the error
            for later in lines[number + 1 :]:
                if (named := _RULE_NAME.match(later)) is not None:
                    return named.group(2)
                if later.startswith("-"):
                    break
            return None
    return None


def _parse(name: str, text: str, errors: list[RuleError]) -> list[RuleDoc]:
    """The rule documents of one file; its problems are added to ``errors``."""
    deep = flow_too_deep(text)
    if deep is not None:
        errors.append(RuleError("invalid YAML: nested too deep", file=name, line=deep))
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
        builder = NodeBuilder(loader)
        documents = []
        owners: list[str | None] = []  # the rule each of builder.problems is in, if named
        for item in root.value:
            lines: dict[KeyPath, int] = {}
            found = len(builder.problems)
            data = builder.build(item, (), lines)
            documents.append(RuleDoc(data, name, lines))
            rule = data.get("name") if isinstance(data, dict) else None
            owners += [rule if isinstance(rule, str) else None] * (len(builder.problems) - found)
    except yaml.MarkedYAMLError as exc:
        line, begun, problem = yaml_error_at(text, exc)
        rule = None if begun is None else _rule_at(text, begun)
        errors.append(RuleError(f"invalid YAML: {problem}", file=name, line=line, rule=rule))
        return []
    except yaml.YAMLError as exc:  # the reader's: a character YAML does not allow (NUL)
        line = _line_of(text, exc)
        # its first line: the second is the reader's position in "<unicode string>"
        problem = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        rule = None if line is None else _rule_at(text, line)
        errors.append(RuleError(f"invalid YAML: {problem}", file=name, line=line, rule=rule))
        return []
    except RecursionError:  # block nesting the parser's own recursion cannot follow
        errors.append(RuleError("invalid YAML: nested too deep", file=name))
        return []
    finally:
        loader.dispose()
    errors.extend(
        RuleError(message, file=name, line=line, rule=rule)
        for (line, message), rule in zip(builder.problems, owners, strict=True)
    )
    return documents


def _line_of(text: str, exc: yaml.YAMLError) -> int | None:
    position = getattr(exc, "position", None)
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else None


def read_rule_files(
    path: str | Path, previous: ParsedFiles | None = None, parsed: ParsedFiles | None = None
) -> tuple[list[RuleDoc], list[RuleError]]:
    """Read one rule file, or every ``*.yaml``/``*.yml`` file of a directory in name order.

    Returns ``(documents, errors)``: every rule document in file order, and every file-level
    problem found (unreadable file, invalid YAML, duplicate or non-string keys, a file that is
    not a list). Never raises for bad input; a missing path is one error. A file whose text is
    the same as in ``previous`` (a past read's ``parsed``) is not parsed again; ``parsed`` gets
    every file read without a problem.
    """
    root = Path(path)
    if not root.exists():
        return [], [RuleError("no such rule file or directory", file=str(root))]
    errors: list[RuleError] = []
    before = previous or {}
    after = {} if parsed is None else parsed
    documents = [
        doc for file in yaml_files(root) for doc in _read_file(file, errors, before, after)
    ]
    return documents, errors
