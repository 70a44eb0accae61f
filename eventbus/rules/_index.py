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
Matching walks the trie from the root; a node is reached at most once, and only through edges
the event satisfies, so rules that fail on their first selective field are never looked at.
Values inside arrays carry their membership (``_pattern``): an edge taken through such a value
fixes its arrays' positions for the rest of that branch of the walk, so the conditions of one
rule are met by one element of an array, as EventBridge requires (array consistency); a node
may then be reached once per distinct set of fixed positions.
The event is not flattened up front: a field is looked up the first time a node asks for it
and remembered for the rest of the walk, so an event costs the lookups of the fields its walk
reaches, whatever the size of its payload or the number of paths the patterns mention.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeVar

from eventbus.rules._pattern import CompiledPattern, Membership, Memo, consistent, members_at
from eventbus.rules._pattern_ops import (
    EqualsIgnoreCase,
    Exact,
    Leaf,
    Numeric,
    Prefix,
    Suffix,
    exact_key,
)
from eventbus.rules._pattern_tables import FieldIndex

__all__ = ["PatternIndex"]

K = TypeVar("K", bound=Hashable)


# Per event, what a path holds: ``_UNSEEN`` until first looked up, then ``_ABSENT``, one leaf
# value outside any array, or a list of ``(value, membership)`` pairs (values in arrays). Leaf
# values are never lists (arrays are crossed), so a list is unambiguous, and the common single
# scalar needs no list allocated for it.
_UNSEEN = object()
_ABSENT = object()
# What JSON leaves are; any other value found at a top-level key goes the general way.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _lookup(event: dict[str, Any], keys: tuple[str, ...]) -> object:
    """The leaf values of ``event`` at ``keys``, in the per-event form above.

    The plain walk down nested objects to one scalar is the common case; anything else (an
    array on the way or at the end, a dict subclass) defers to ``members_at``, the reference, so
    the index cannot disagree with ``CompiledPattern.matches`` about which values a path holds.
    """
    value: object = event
    for key in keys:
        if type(value) is not dict:
            if isinstance(value, list | dict):
                return _general(event, keys)
            return _ABSENT
        value = value.get(key, _ABSENT)
        if value is _ABSENT:
            return _ABSENT
    if type(value) in _SCALARS:
        return value
    if isinstance(value, list):
        return _general(event, keys)
    if isinstance(value, dict):
        return _ABSENT
    return value


def _general(event: dict[str, Any], keys: tuple[str, ...]) -> object:
    members = members_at(event, keys)
    if not members:
        return _ABSENT
    if len(members) == 1 and not members[0][1]:
        return members[0][0]  # one value outside any array (under a dict subclass, say)
    return members


def _bind(
    members: list[tuple[object, Membership]],
    positions: dict[int, int],
    index: FieldIndex[_Node],
    bound: list[tuple[_Node, dict[int, int]]],
) -> None:
    """Queue the children of ``index`` each array value in ``members`` leads to, bound to that
    value's array elements; values in an element other than one ``positions`` holds are
    skipped."""
    for value, membership in members:
        fixed = consistent(positions, membership)
        if fixed is None:
            continue
        following: set[_Node] = set()
        index.collect(value, following)
        bound.extend((child, fixed) for child in following)


class _Node:
    """A trie node as the walk reads it: the entries that end here and the edges leaving it.

    Immutable once built; nodes without ends or absence edges share the empty tuple, so the
    walk touches as little memory as possible (at 10,000 rules the index is megabytes, and
    cache misses, not instructions, are much of the cost of an event).
    """

    __slots__ = ("absent", "children", "edges", "ends")

    def __init__(self) -> None:
        self.ends: tuple[int, ...] = ()
        # Every node an edge leads to: what may match below it, when the walk gives up.
        self.children: tuple[_Node, ...] = ()
        # Per path number (``PatternIndex._paths``): the field's index, and its exact-value
        # dict when that is all it holds (the walk then looks the value up inline).
        self.edges: tuple[tuple[int, FieldIndex[_Node], dict[object, list[_Node]] | None], ...] = ()
        # Children reached because the event has no value at a path ({"exists": false}).
        self.absent: tuple[tuple[int, _Node], ...] = ()


class _Draft:
    """A node while the index is built: what it takes to insert conditions, dropped after."""

    __slots__ = ("absent", "children", "ends", "fields", "node")

    def __init__(self) -> None:
        self.node = _Node()
        self.children: dict[Leaf, _Draft] = {}
        self.fields: dict[int, FieldIndex[_Node]] = {}
        self.absent: list[tuple[int, _Node]] = []
        self.ends: list[int] = []

    def child(self, leaf: Leaf, path: int) -> _Draft:
        draft = self.children.get(leaf)
        if draft is None:
            draft = self.children[leaf] = _Draft()
            index = self.fields.get(path)
            if index is None:
                index = self.fields[path] = FieldIndex[_Node]()
            for matcher in leaf.matchers:
                index.add(matcher, draft.node)
            if leaf.absent_ok:
                self.absent.append((path, draft.node))
        return draft

    def freeze(self) -> None:
        for index in self.fields.values():
            index.freeze()
        node = self.node
        if self.ends:
            node.ends = tuple(self.ends)
        if self.absent:
            node.absent = tuple(self.absent)
        if self.children:
            node.children = tuple(draft.node for draft in self.children.values())
        node.edges = tuple(
            (path, index, index.exact if index.exact_only else None)
            for path, index in self.fields.items()
        )


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


# Steps of the bound walk (branches taken, array values tried) before the reference takes
# over: real events need a handful; the reference's cost is one ``matches`` per pattern.
_MAX_BINDINGS = 5_000


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
        # every pattern by slot: the reference answers an event whose arrays are too many
        # ways of binding for the walk (``_walk_bound``)
        self._patterns: list[tuple[int, CompiledPattern]] = []
        slot_of: dict[K, int] = {}
        root = _Draft()
        # Paths are numbered so that a per-event list, not a dict, remembers their lookups.
        path_ids: dict[tuple[str, ...], int] = {}
        for key, pattern in listed:
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = len(self._keys)
                self._keys.append(key)
            self._patterns.append((slot, pattern))
            for conjunction in pattern.alternatives:
                draft = root
                for leaf in sorted(conjunction, key=order):
                    draft = draft.child(leaf, path_ids.setdefault(leaf.path, len(path_ids)))
                if slot not in draft.ends:
                    draft.ends.append(slot)
        self._paths = tuple(path_ids)
        self._root = root.node
        stack = [root]
        while stack:
            draft = stack.pop()
            draft.freeze()
            stack.extend(draft.children.values())

    def __len__(self) -> int:
        """The number of distinct keys."""
        return len(self._keys)

    def _walk_bound(
        self,
        event: dict[str, Any],
        seen: list[object],
        bound: list[tuple[_Node, dict[int, int]]],
        slots: list[int],
    ) -> bool:
        """The walk below edges taken through values inside arrays: each branch carries the
        array elements it is bound to, and an edge through another value in one of those
        arrays is taken only from the same element (array consistency). Rare and short next
        to the free walk in ``match``, which it is kept apart from so that one stays lean; a
        node is visited once per distinct binding. False, with ``slots`` incomplete, past
        ``_MAX_BINDINGS`` steps: fields with many values in arrays of their own multiply
        the bindings (m^(k-1); 50 s for five fields in 600 bytes of data)."""
        visited: set[tuple[_Node, frozenset[tuple[int, int]]]] = set()
        budget = _MAX_BINDINGS
        while bound:
            budget -= 1
            if budget < 0:
                return False
            node, positions = bound.pop()
            key = (node, frozenset(positions.items()))
            if key in visited:
                continue
            visited.add(key)
            if node.ends:
                slots.extend(node.ends)
            for path, index, _ in node.edges:
                found = seen[path]
                if found is _UNSEEN:
                    found = seen[path] = _lookup(event, self._paths[path])
                if found is _ABSENT:
                    continue
                if type(found) is list:
                    _bind(found, positions, index, bound)
                    budget -= len(found)
                    continue
                following: set[_Node] = set()
                index.collect(found, following)
                bound.extend((child, positions) for child in following)
            for path, child in node.absent:
                found = seen[path]
                if found is _UNSEEN:
                    found = seen[path] = _lookup(event, self._paths[path])
                if found is _ABSENT:
                    bound.append((child, positions))
        return True

    def _reference(self, event: dict[str, Any], found: list[int], starts: list[_Node]) -> list[int]:
        """The slots of the patterns ``event`` matches among those ending at or below
        ``starts`` or in ``found``, each tested by its ``matches`` (sharing one memo: rules
        testing the same fields of one array look at it once)."""
        candidates = set(found)
        stack, reached = list(starts), set()
        while stack:
            node = stack.pop()
            if node in reached:
                continue
            reached.add(node)
            candidates.update(node.ends)
            stack.extend(node.children)
        memo = Memo()
        return [
            slot
            for slot, pattern in self._patterns
            if slot in candidates and pattern.matches(event, memo)
        ]

    def match(self, event: dict[str, Any]) -> list[K]:
        """Keys of every pattern ``event`` matches, each once, in first-insertion order.

        Agrees with testing each pattern's ``matches`` in turn; never raises for a JSON-shaped
        event (unexpected shapes simply do not match).
        """
        paths = self._paths
        # A path is often tested at several nodes (``type`` at the root and under each
        # ``source``): it is looked up once per event, and only when some node asks for it.
        seen: list[object] = [_UNSEEN] * len(paths)
        slots: list[int] = []
        # Branches that took an edge through a value inside an array: walked after the free
        # walk below, bound to that value's array elements (see ``_walk_bound``).
        bound: list[tuple[_Node, dict[int, int]]] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.ends:
                slots.extend(node.ends)
            # Each child hangs under one field of one parent, so children found through
            # different fields never coincide, and an exact lookup of a single value yields
            # each child once: only the general case needs a set to reach a child only once.
            for path, index, exact in node.edges:
                found = seen[path]
                if found is _UNSEEN:
                    steps = paths[path]
                    # Top-level attributes (source, type, subject) are most of the lookups,
                    # and a plain scalar there needs no function call.
                    if len(steps) == 1:
                        found = event.get(steps[0], _ABSENT)
                        if type(found) not in _SCALARS and found is not _ABSENT:
                            found = _lookup(event, steps)
                    else:
                        found = _lookup(event, steps)
                    seen[path] = found
                if found is _ABSENT:
                    continue
                if type(found) is list:
                    _bind(found, {}, index, bound)
                elif exact is not None:
                    hit = exact.get(found if type(found) is str else exact_key(found))
                    if hit:
                        stack.extend(hit)
                else:
                    following: set[_Node] = set()
                    index.collect(found, following)
                    stack.extend(following)
            for path, child in node.absent:
                found = seen[path]
                if found is _UNSEEN:
                    found = seen[path] = _lookup(event, paths[path])
                if found is _ABSENT:
                    stack.append(child)
        if bound:
            # The nodes the bound walk starts from: if it gives up, every pattern that can
            # match is one found already or one ending below them (the reference tested every
            # pattern of the set, its cost the number of rules times the event's arrays).
            starts = [node for node, _ in bound]
            if not self._walk_bound(event, seen, bound, slots):
                slots = self._reference(event, slots, starts)
        if len(slots) < 2:
            return [self._keys[slot] for slot in slots]
        keys = self._keys
        return [keys[slot] for slot in sorted(set(slots))]
