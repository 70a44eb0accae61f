"""YAML with line numbers: the one loader every user-edited file (settings, connectors) goes
through, so that an error can name the file and the line of the offending key.

``load_yaml`` returns plain Python data plus a side table mapping each node's path (a tuple of
keys and list indexes) to its 1-based line; ``line_of`` finds the nearest known line for a path
that pydantic reports, walking up to the closest ancestor that exists in the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from eventbus._errors import ConfigError

__all__ = ["YamlDoc", "load_yaml", "pydantic_errors"]

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class YamlDoc:
    """A parsed YAML document and where each of its nodes stands in the file."""

    data: Any
    file: str
    lines: dict[Path, int] = field(default_factory=dict)

    def normalize(self, loc: Sequence[str | int]) -> Path:
        """Drop components a validator adds that are not in the file (union tags), so that
        ``targets.1.http.url`` becomes ``targets.1.url``."""
        out: Path = ()
        parts = list(loc)
        for i, part in enumerate(parts):
            nxt = parts[i + 1] if i + 1 < len(parts) else None
            if (*out, part) not in self.lines and nxt is not None and (*out, nxt) in self.lines:
                continue
            out = (*out, part)
        return out

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line of ``path`` or of its closest ancestor present in the file."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)


def _construct(node: yaml.Node, path: Path, lines: dict[Path, int]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in out:
                raise ConfigError(f"{key_node.start_mark.line + 1}: duplicate key {key!r}")
            child = (*path, key)
            out[key] = _construct(value_node, child, lines)
            lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{node.start_mark.line + 1}: a mapping key must be a scalar")
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node)
    finally:
        loader.dispose()


def load_yaml(text: str, file: str) -> YamlDoc:
    """Parse one YAML document.

    Raises ConfigError naming the file and line for a syntax error or a duplicate key.
    An empty document gives ``data=None``.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{file}{line}: invalid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from exc
    lines: dict[Path, int] = {}
    if node is None:
        return YamlDoc(None, file, lines)
    try:
        data = _construct(node, (), lines)
    except ConfigError as exc:
        raise ConfigError(f"{file}:{exc}") from exc
    return YamlDoc(data, file, lines)


def pydantic_errors(doc: YamlDoc, exc: Any, *, prefix: Path = ()) -> list[str]:
    """Render a pydantic ValidationError as ``file:line: field.path: message`` lines."""
    out = []
    for err in exc.errors():
        loc = doc.normalize((*prefix, *err["loc"]))
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            # point at the discriminating key itself (``type:``), not the whole entry
            tag = str(err.get("ctx", {}).get("discriminator", "")).strip("'")
            if tag:
                loc = (*loc, tag)
        line = doc.line_of(loc)
        where = f"{doc.file}:{line}" if line is not None else doc.file
        dotted = ".".join(str(p) for p in loc) or "(document)"
        out.append(f"{where}: {dotted}: {err['msg']}")
    return out
