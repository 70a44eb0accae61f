"""Event patterns (the EventBridge pattern language) compiled once and matched against events.

Rule engine, step one: a rule's ``pattern`` is compiled here when the rule set loads; the router
asks ``PatternIndex`` (``_index``) which rules match an event, and only then evaluates CEL and
transforms. ``matches`` and ``CompiledPattern.matches`` evaluate one pattern directly; they are
the reference semantics the index must agree with.

An event is a CloudEvent in JSON form: attributes at the top level, payload under ``data``. A
pattern mirrors that shape; every leaf is an array of alternatives (parsed by
``_pattern_parse`` into the matchers of ``_pattern_ops``), the fields of one object are ANDed,
and ``"$or": [{...}, {...}]`` ORs sub-patterns. Field paths are tuples of keys, so a key
containing a dot is never confused with nesting. The language is specified in
``docs/patterns.md``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from eventbus._errors import PatternError
from eventbus.rules._pattern_ops import Leaf
from eventbus.rules._pattern_parse import parse_leaf

__all__ = [
    "MAX_ALTERNATIVES",
    "CompiledPattern",
    "compile_pattern",
    "matches",
    "values_at",
]

# "$or" multiplies out into alternatives for the index; this bounds the blow-up of many
# parallel "$or"s (each alternative costs index memory) while leaving real patterns alone.
MAX_ALTERNATIVES = 1024
# Deeper patterns than any real event shape are refused rather than risking recursion limits.
_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class CompiledPattern:
    """An immutable, validated event pattern.

    ``leaves`` are the field conditions of the pattern object (all must hold); each entry of
    ``any_of`` is one ``"$or"``: at least one of its sub-patterns must hold. Paths are absolute
    (from the event root) at every level. ``alternatives`` is the same pattern multiplied out
    into a disjunction of plain conjunctions, precomputed for the index.
    """

    leaves: tuple[Leaf, ...]
    any_of: tuple[tuple[CompiledPattern, ...], ...]
    alternatives: tuple[tuple[Leaf, ...], ...]

    def matches(self, event: dict[str, Any]) -> bool:
        """True when ``event`` satisfies the pattern; never raises for any JSON-shaped event."""
        for leaf in self.leaves:
            if not leaf.test(values_at(event, leaf.path)):
                return False
        return all(any(sub.matches(event) for sub in group) for group in self.any_of)


def compile_pattern(pattern: object) -> CompiledPattern:
    """Validate and compile an event pattern (a JSON object, as parsed from JSON or YAML).

    The empty object ``{}`` matches every event. Raises ``PatternError`` naming the dotted path
    of the first malformed field, or the whole pattern when it is not an object or ``"$or"``
    multiplies out past ``MAX_ALTERNATIVES`` alternatives.
    """
    if not isinstance(pattern, dict):
        raise PatternError(f"a pattern must be a JSON object, got {type(pattern).__name__}")
    return _compile_object(pattern, (), "", depth=0)


def matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    """Compile ``pattern`` and test one ``event``; raises ``PatternError`` for a bad pattern.

    For many events or many patterns, compile once (``compile_pattern``) or use ``PatternIndex``.
    """
    return compile_pattern(pattern).matches(event)


def _compile_object(
    obj: dict[Any, Any], prefix: tuple[str, ...], where: str, *, depth: int
) -> CompiledPattern:
    """``depth`` counts objects from the top, ``$or`` branches included."""
    if not obj and depth:
        raise PatternError("empty object: give at least one field", path=where)
    if depth > _MAX_DEPTH:
        raise PatternError(f"pattern nested deeper than {_MAX_DEPTH} levels", path=where)
    leaves: list[Leaf] = []
    any_of: list[tuple[CompiledPattern, ...]] = []
    for key, spec in obj.items():
        if not isinstance(key, str):
            raise PatternError(f"field names must be strings, got {key!r}", path=where)
        at = f"{where}.{key}" if where else key
        if key == "$or":
            any_of.append(_compile_or(spec, prefix, at, depth + 1))
        elif isinstance(spec, dict):
            sub = _compile_object(spec, (*prefix, key), at, depth=depth + 1)
            leaves.extend(sub.leaves)
            any_of.extend(sub.any_of)
        else:
            leaves.append(parse_leaf(spec, (*prefix, key), at))
    alternatives = _multiply(tuple(leaves), any_of, where)
    return CompiledPattern(tuple(leaves), tuple(any_of), alternatives)


def _compile_or(
    spec: object, prefix: tuple[str, ...], where: str, depth: int
) -> tuple[CompiledPattern, ...]:
    if not isinstance(spec, list) or len(spec) < 2:
        raise PatternError("$or takes an array of at least two pattern objects", path=where)
    subs: list[CompiledPattern] = []
    for i, sub in enumerate(spec):
        at = f"{where}[{i}]"
        if not isinstance(sub, dict):
            raise PatternError("each $or alternative must be a pattern object", path=at)
        subs.append(_compile_object(sub, prefix, at, depth=depth))
    return tuple(subs)


def _multiply(
    leaves: tuple[Leaf, ...], any_of: list[tuple[CompiledPattern, ...]], where: str
) -> tuple[tuple[Leaf, ...], ...]:
    """Distribute AND over the ``$or`` groups: one conjunction per choice of sub-pattern."""
    total = 1
    for group in any_of:
        total *= sum(len(sub.alternatives) for sub in group)
        if total > MAX_ALTERNATIVES:
            raise PatternError(
                f"$or expands to more than {MAX_ALTERNATIVES} alternatives; "
                "split the rule into several rules",
                path=where,
            )
    choices = [[alt for sub in group for alt in sub.alternatives] for group in any_of]
    return tuple(
        leaves + tuple(leaf for alt in combo for leaf in alt)
        for combo in itertools.product(*choices)
    )


def values_at(event: dict[str, Any], path: tuple[str, ...]) -> list[object]:
    """Every leaf value of ``event`` at ``path``: arrays (also arrays of objects) are crossed
    and flattened, objects are not leaves. An empty list means the field is absent."""
    current: list[object] = [event]
    for key in path:
        following: list[object] = []
        for node in _expand(current):
            if isinstance(node, dict) and key in node:
                following.append(node[key])
        if not following:
            return []
        current = following
    return [v for v in _expand(current) if not isinstance(v, dict)]


def _expand(nodes: list[object]) -> list[object]:
    """``nodes`` with arrays (at any depth) replaced by their elements, without recursion."""
    out: list[object] = []
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        else:
            out.append(node)
    return out
