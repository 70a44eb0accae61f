"""Many compiled event patterns folded into one index, so matching an event costs about the
same for ten rules as for ten thousand.

Rule engine, step two: the rule set builds one ``PatternIndex`` when it loads (and a new one on
reload: the index is immutable, so it is swapped whole); the router calls ``match`` once per
event and evaluates CEL and transforms only for the keys it returns.

How it works (the idea of aws/event-ruler and quamina, built independently): every pattern is
multiplied out into conjunctions of field conditions (``CompiledPattern.alternatives``), each
conjunction is sorted with its most selective conditions first, and the conjunctions are merged
into a trie whose edges are conditions. A node keeps, per field path, one ``FieldIndex``
(``_pattern_tables``) that maps a leaf value to the child nodes whose edge condition it
satisfies: a dict for exact values, dicts by length for prefixes and suffixes, sorted bound
tables for numeric ranges, and a short residual list only for what cannot be hashed or sorted
(wildcard, cidr, anything-but, exists).
Matching flattens the event once and walks the trie from the root; a node is reached at most
once, and only through edges the event satisfies, so rules that fail on their first selective
field are never looked at.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeAlias, TypeVar

from eventbus.rules._pattern import CompiledPattern
from eventbus.rules._pattern_ops import (
    EqualsIgnoreCase,
    Exact,
    Leaf,
    Numeric,
    Prefix,
    Suffix,
)
from eventbus.rules._pattern_tables import FieldIndex

__all__ = ["PatternIndex"]

K = TypeVar("K", bound=Hashable)


_MISSING = object()

# The field paths some pattern mentions, as a trie of keys: each key maps to the number of its
# full path and to the keys below it. Paths are numbered once, so flattening an event allocates
# no path tuples and every later lookup hashes a small int.
_PathTrie: TypeAlias = dict[str, tuple[int, "_PathTrie"]]


def _add_path(trie: _PathTrie, path: tuple[str, ...], ids: dict[tuple[str, ...], int]) -> int:
    """Put ``path`` and its prefixes in ``trie``; returns the number of ``path``."""
    for depth, key in enumerate(path):
        if key not in trie:
            trie[key] = (ids.setdefault(path[: depth + 1], len(ids)), {})
        trie = trie[key][1]
    return ids[path]


def _flatten(event: dict[str, Any], trie: _PathTrie) -> dict[int, list[object]]:
    """Map each wanted leaf path (by number) of ``event`` to its leaf values, without recursion.

    Only keys in ``trie`` are looked up, so the cost follows the patterns, not the size of the
    payload. Arrays (also of objects, also nested) are crossed; objects are not leaves. Agrees
    with ``values_at`` for every path in the trie.
    """
    out: dict[int, list[object]] = {}
    objects: list[tuple[_PathTrie, dict[str, Any]]] = [(trie, event)]
    while objects:
        level, obj = objects.pop()
        for key, (path, below) in level.items():
            value = obj.get(key, _MISSING)
            if value is _MISSING:
                continue
            if isinstance(value, dict):
                if below:
                    objects.append((below, value))
            elif isinstance(value, list):
                _cross(value, path, below, objects, out)
            else:
                leaves = out.get(path)
                if leaves is None:
                    out[path] = [value]
                else:
                    leaves.append(value)
    return out


def _cross(
    array: list[Any],
    path: int,
    below: _PathTrie,
    objects: list[tuple[_PathTrie, dict[str, Any]]],
    out: dict[int, list[object]],
) -> None:
    """Record the scalars of ``array`` (nested arrays included) at ``path`` and queue its
    objects for the keys ``below``."""
    pending = list(array)
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if below:
                objects.append((below, value))
        elif isinstance(value, list):
            pending.extend(value)
        elif path in out:
            out[path].append(value)
        else:
            out[path] = [value]


class _Node:
    """A trie node: conditions leading further (per path), and the entries that end here."""

    __slots__ = ("absent", "children", "edges", "ends", "fields")

    def __init__(self) -> None:
        self.children: dict[Leaf, _Node] = {}
        # Keyed by path number (see ``_add_path``).
        self.fields: dict[int, FieldIndex[_Node]] = {}
        # Children reached because the event has no value at a path ({"exists": false}).
        self.absent: list[tuple[int, _Node]] = []
        self.ends: list[int] = []
        # ``fields`` as the matching loop reads it (set by ``freeze``): path number, index, and
        # the index's exact-value dict when that is all it holds.
        self.edges: tuple[tuple[int, FieldIndex[_Node], dict[object, list[_Node]] | None], ...] = ()

    def freeze(self) -> None:
        for index in self.fields.values():
            index.freeze()
        self.edges = tuple(
            (path, index, index.exact if index.exact_only else None)
            for path, index in self.fields.items()
        )

    def child(self, leaf: Leaf, path: int) -> _Node:
        node = self.children.get(leaf)
        if node is None:
            node = self.children[leaf] = _Node()
            index = self.fields.get(path)
            if index is None:
                index = self.fields[path] = FieldIndex[_Node]()
            for matcher in leaf.matchers:
                index.add(matcher, node)
            if leaf.absent_ok:
                self.absent.append((path, node))
        return node


def _rank(leaf: Leaf) -> int:
    """How early a condition should be tested: hashed lookups that usually narrow the
    candidates to a few first, conditions most values satisfy (or absence) last."""
    if leaf.absent_ok:
        return 4
    worst = 0
    for matcher in leaf.matchers:
        if isinstance(matcher, Exact):
            rank = 0
        elif isinstance(matcher, EqualsIgnoreCase | Prefix):
            rank = 1
        elif isinstance(matcher, Numeric):
            rank = 1 if matcher.low is not None and matcher.low == matcher.high else 2
        elif isinstance(matcher, Suffix):
            rank = 2
        else:
            rank = 3
        worst = max(worst, rank)
    return worst


def _spread(patterns: list[CompiledPattern]) -> dict[tuple[str, ...], int]:
    """Per path, how many different conditions the patterns place on it: among equally ranked
    conditions, the path with the most different values splits the rules most finely."""
    seen: set[Leaf] = set()
    spread: dict[tuple[str, ...], int] = {}
    for pattern in patterns:
        for conjunction in pattern.alternatives:
            for leaf in conjunction:
                if leaf not in seen:
                    seen.add(leaf)
                    spread[leaf.path] = spread.get(leaf.path, 0) + 1
    return spread


class PatternIndex(Generic[K]):
    """An immutable index of compiled patterns, each under a key (typically a rule name).

    Several entries may share a key (a rule with several patterns); the key then matches when
    any of them does.
    """

    def __init__(self, entries: Iterable[tuple[K, CompiledPattern]]) -> None:
        """Build the index; never raises for compiled patterns (they are already valid)."""
        listed = list(entries)
        spread = _spread([pattern for _, pattern in listed])

        def order(leaf: Leaf) -> tuple[int, int, tuple[str, ...]]:
            return (_rank(leaf), -spread[leaf.path], leaf.path)

        self._keys: list[K] = []
        slot_of: dict[K, int] = {}
        self._root = _Node()
        self._paths: _PathTrie = {}
        path_ids: dict[tuple[str, ...], int] = {}
        for key, pattern in listed:
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = len(self._keys)
                self._keys.append(key)
            for conjunction in pattern.alternatives:
                node = self._root
                for leaf in sorted(conjunction, key=order):
                    node = node.child(leaf, _add_path(self._paths, leaf.path, path_ids))
                if slot not in node.ends:
                    node.ends.append(slot)
        self._freeze()

    def _freeze(self) -> None:
        stack = [self._root]
        while stack:
            node = stack.pop()
            node.freeze()
            stack.extend(node.children.values())

    def __len__(self) -> int:
        """The number of distinct keys."""
        return len(self._keys)

    def match(self, event: dict[str, Any]) -> list[K]:
        """Keys of every pattern ``event`` matches, each once, in first-insertion order.

        Agrees with testing each pattern's ``matches`` in turn; never raises for a JSON-shaped
        event (unexpected shapes simply do not match).
        """
        values = _flatten(event, self._paths)
        get = values.get
        slots: list[int] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.ends:
                slots.extend(node.ends)
            # Each child hangs under one field of one parent, so children found through
            # different fields never coincide, and an exact lookup of a single value yields
            # each child once: only the general case needs a set to reach a child only once.
            for path, index, exact in node.edges:
                found = get(path)
                if not found:
                    continue
                if exact is not None and len(found) == 1:
                    value = found[0]
                    # The key of ``exact_key``, inlined.
                    hit = exact.get(value if type(value) is str else (type(value), value))
                    if hit:
                        stack.extend(hit)
                else:
                    following: set[_Node] = set()
                    index.collect(found, following)
                    stack.extend(following)
            for path, child in node.absent:
                if path not in values:
                    stack.append(child)
        if len(slots) < 2:
            return [self._keys[slot] for slot in slots]
        keys = self._keys
        return [keys[slot] for slot in sorted(set(slots))]
