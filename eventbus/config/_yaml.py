"""YAML with line numbers: the one reader every user-edited file (settings, connectors, rules)
goes through, so that an error can name the file and the line of the offending key.

``NodeBuilder`` turns a composed YAML node tree into plain data plus a side table mapping each
node's path (a tuple of keys and list indexes) to its 1-based line, noting every problem
(duplicate or non-string keys, self-referencing aliases, unsupported tags) instead of stopping
at the first. ``YamlDoc.line`` finds the nearest known line for a path that a validator
reports, walking up to the closest ancestor that exists in the file. Callers choose the YAML
dialect by the loader class they hand in (rules use a narrower one; see ``eventbus.rules``).
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from eventbus._errors import ConfigError

__all__ = [
    "KeyPath",
    "NodeBuilder",
    "YamlDoc",
    "did_you_mean",
    "flow_too_deep",
    "load_yaml",
    "pydantic_errors",
    "yaml_error_at",
    "yaml_files",
]

KeyPath = tuple[str | int, ...]

MAX_DEPTH = 128
"""Levels a document may nest: beyond them building it ran out of Python's stack (a
RecursionError out of the loader); no settings, connector or rule file needs more."""
MAX_REPEATED = 100_000
"""Values a document may build again through aliases: a few hundred bytes of aliases of
aliases (the "billion laughs") expanded to gigabytes and stalled the process for minutes."""
MAX_REPEATED_TEXT = 8 * 1024 * 1024
"""Characters of scalars a document may repeat through aliases: 20,000 aliases of one 100 KB
string (a 180 KB file) cost 2 GB and 6 s when the rule set was written out as JSON, and with
less memory than that the process crashed."""
# Flow collections ([ {) nested this deep are refused before parsing: libyaml's composer
# recurses in C, and 50,000 levels crashed the process (a segmentation fault). Below the
# thousand levels PyYAML 6.0.4's libyaml refuses in its own words, so that every PyYAML
# says the same; above MAX_DEPTH, so that the builder names the line of a deep value.
_MAX_FLOW_DEPTH = 256
_BRACKETS = re.compile(r"[\[\]{}]")
_LONG_INTEGER = re.compile(r"[-+]?[0-9_]+")


def flow_too_deep(text: str) -> int | None:
    """The line where ``[`` and ``{`` nest more than ``_MAX_FLOW_DEPTH`` levels deep (counted
    without regard to quoting: a bound, not a parse), or None."""
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth += 1 if match[0] in "[{" else -1
        if depth > _MAX_FLOW_DEPTH:
            return text.count("\n", 0, match.start()) + 1
    return None


@dataclass(frozen=True)
class YamlDoc:
    """A parsed YAML document (or one item of it) and where each of its nodes stands."""

    data: Any
    file: str
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def normalize(self, loc: Sequence[str | int]) -> KeyPath:
        """Drop components a validator adds that are not in the file (union tags), so that
        ``targets.1.http.url`` becomes ``targets.1.url``."""
        out: KeyPath = ()
        parts = list(loc)
        for i, part in enumerate(parts):
            nxt = parts[i + 1] if i + 1 < len(parts) else None
            if (*out, part) not in self.lines and nxt is not None and (*out, nxt) in self.lines:
                continue
            out = (*out, part)
        return out

    def line(self, loc: Sequence[str | int] = ()) -> int | None:
        """The line of ``loc`` or of its closest ancestor in the file (None when unknown, as
        for documents that never were in a file)."""
        path = tuple(loc)
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)


class NodeBuilder:
    """Turns a composed YAML node tree into plain data and a line table, noting every problem
    in ``problems`` as (line, message)."""

    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.problems: list[tuple[int, str]] = []
        self._open: set[int] = set()
        self._built: set[int] = set()  # nodes built once: building one again is an alias
        self._repeated = 0
        self._repeated_text = 0
        self._merged: dict[int, int] = {}  # mapping node -> pairs its `<<` merged in

    def build(self, node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> Any:
        line = node.start_mark.line + 1
        lines.setdefault(path, line)
        if id(node) in self._open:
            self.problems.append((line, "an alias refers to itself"))
            return None
        if len(path) > MAX_DEPTH:
            self.problems.append((line, f"nested more than {MAX_DEPTH} levels deep"))
            return None
        if id(node) not in self._built:
            self._built.add(id(node))
        elif self._repeated >= MAX_REPEATED or self._repeated_text > MAX_REPEATED_TEXT:
            return None  # reported once, below
        else:
            self._repeated += 1
            if isinstance(node, yaml.ScalarNode):
                self._repeated_text += len(node.value)
            if self._repeated == MAX_REPEATED:
                self.problems.append(
                    (line, f"aliases repeat more than {MAX_REPEATED:,} values: write them out")
                )
                return None
            if self._repeated_text > MAX_REPEATED_TEXT:
                self.problems.append(
                    (
                        line,
                        f"aliases repeat more than {MAX_REPEATED_TEXT:,} characters of text: "
                        "write them out",
                    )
                )
                return None
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node)
            except yaml.YAMLError:
                raise  # the loaders' own, with its mark
            except Exception as exc:  # what PyYAML's constructors let escape
                # Python reads at most 4,300 digits into an int; `!!timestamp 2020-13-45` is no
                # date, `!!bool maybe` no bool (ValueError, KeyError, IndexError): each escaped
                # the loaders without file or line (a rules reload answered 500)
                most = sys.get_int_max_str_digits()
                if _LONG_INTEGER.fullmatch(node.value) and len(node.value) > most:
                    problem = f"an integer of more than {most:,} digits (quote it for text)"
                else:
                    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
                    why = f": {exc}" if isinstance(exc, ValueError) else ""  # a KeyError: 'maybe'
                    problem = f"cannot read {node.value[:40]!r} as {tag}{why}"
                self.problems.append((line, problem))
                return None
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
            merged = self._merged.get(id(node))
            if merged is None:  # not flattened yet (it changes the node: an alias sees it so)
                own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
                self.loader.flatten_mapping(node)
                # flatten_mapping puts the pairs merged in by `<<` first; own keys override.
                merged = self._merged[id(node)] = len(node.value) - own
            mapping: dict[str, Any] = {}
            from_merge: set[str] = set()
            for index, (key_node, value_node) in enumerate(node.value):
                line = key_node.start_mark.line + 1
                # at the mapping's depth: a key past the limit was said "nested too deep" and
                # then "None must be a string"
                noted = len(self.problems)
                key = self.build(key_node, path, {})
                if key is None and len(self.problems) > noted:
                    continue  # said already (too deep, or a value YAML cannot read)
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


def yaml_files(path: Path) -> list[Path]:
    """``path`` itself, or every ``*.yaml``/``*.yml`` file of a directory in name order, but
    hidden ones (a name starting with a dot: an editor's lock or backup file, such as Emacs's
    ``.#rules.yaml``, a link to nothing that refused every reload while the file was open)."""
    if path.is_dir():
        # not is_file(): a link to nothing is named as unreadable, not silently skipped
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and not p.is_dir()
        )
    return [path]


def load_yaml(text: str, file: str) -> YamlDoc:
    """Parse one YAML document (YAML 1.1 safe dialect).

    Raises ConfigError naming the file and the line of every problem: a syntax error, a
    duplicate or non-string key, a self-referencing alias. An empty document gives
    ``data=None``.
    """
    deep = flow_too_deep(text)
    if deep is not None:
        raise ConfigError(f"{file}:{deep}: invalid YAML: nested too deep")
    loader = yaml.SafeLoader(text)
    lines: dict[KeyPath, int] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return YamlDoc(None, file, lines)
        builder = NodeBuilder(loader)
        data = builder.build(node, (), lines)
    except yaml.MarkedYAMLError as exc:
        at, _, problem = yaml_error_at(text, exc)
        line = "" if at is None else f":{at}"
        raise ConfigError(f"{file}{line}: invalid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from exc
    except RecursionError as exc:  # block nesting the parser's own recursion cannot follow
        raise ConfigError(f"{file}: invalid YAML: nested too deep") from exc
    finally:
        loader.dispose()
    if builder.problems:
        raise ConfigError(
            "\n".join(f"{file}:{line}: {message}" for line, message in builder.problems)
        )
    return YamlDoc(data, file, lines)


def pydantic_errors(
    doc: YamlDoc,
    exc: Any,
    *,
    prefix: KeyPath = (),
    fields: Collection[str] = (),
    model: type[BaseModel] | None = None,
) -> list[str]:
    """Render a pydantic ValidationError as ``file:line: field.path: message`` lines; a key
    the model does not have gets the closest of its top-level ``fields`` suggested, or, with
    ``model``, of the fields of the model where it stands, at any depth."""
    out = []
    for err in exc.errors():
        loc = doc.normalize((*prefix, *err["loc"]))
        line = doc.line(loc)
        where = f"{doc.file}:{line}" if line is not None else doc.file
        dotted = ".".join(str(p) for p in loc) or "(document)"
        message = err["msg"]
        if err["type"] == "extra_forbidden" and model is not None:
            message += did_you_mean(str(err["loc"][-1]), fields_at(model, err["loc"][:-1]))
        elif err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            message += did_you_mean(str(err["loc"][0]), fields)
        out.append(f"{where}: {dotted}: {message}")
    return out


def fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Collection[str]:
    """The fields of the model nested in ``model`` at ``loc`` (none when there is none)."""
    for part in loc:
        if isinstance(part, int):  # an item of a list: its model is the list's
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return ()
        nested = [
            arg
            for arg in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        ]
        if not nested:
            return ()
        model = nested[0]
    return model.model_fields.keys()


def did_you_mean(name: str, known: Collection[str]) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``known`` to a misspelt ``name``, or
    ``""`` when none is close."""
    hint = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def yaml_error_at(text: str, exc: yaml.MarkedYAMLError) -> tuple[int | None, int | None, str]:
    """The line of a YAML error, the line of what the parser was reading then (a rule file
    names the rule holding it), and what it says. The parser reading a quote or a bracket
    that was never closed finds the mistake further on (the end of the text, the next rule):
    the error named the rule there, and its line was the end's."""
    problem = exc.problem or exc.context or "invalid YAML"
    mark, begun = exc.problem_mark, exc.context_mark
    if mark is None:
        mark = begun
    elif exc.context and begun is not None and begun.line != mark.line:
        problem = f"{problem} ({exc.context}, from line {begun.line + 1})"
        if mark.index >= len(text.rstrip()):
            mark = begun
        elif not _UNCLOSED.search(exc.context):
            begun = mark  # a block collection's start is the file's list: not the rule's
    else:
        begun = mark
    line = None if mark is None else mark.line + 1
    return line, (None if begun is None else begun.line + 1), problem


# What the parser reads until a closing character: the part of the text the mistake is in.
_UNCLOSED = re.compile(r"\b(?:quoted scalar|flow (?:sequence|mapping))\b")
