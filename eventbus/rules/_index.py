"""Many compiled event patterns folded into one index, so matching an event costs about the
same for ten rules as for ten thousand.

Rule engine, step two: the rule set builds one ``PatternIndex`` when it loads (and a new one on
reload: the index is immutable, so it is swapped whole); the router calls ``match`` once per
event and evaluates CEL and transforms only for the keys it returns.

How it works (the idea of aws/event-ruler and quamina, built independently): every pattern is
multiplied out into conjunctions of field conditions (``CompiledPattern.alternatives``), each
conjunction is sorted with its most selective conditions first, and the conjunctions are merged
into a trie whose edges are conditions. A node keeps, per field path, one ``_FieldIndex`` that
maps a leaf value to the child nodes whose edge condition it satisfies: a dict for exact values,
dicts by length for prefixes and suffixes, sorted bound tables for numeric ranges, and a short
residual list only for what cannot be hashed or sorted (wildcard, cidr, anything-but, exists).
Matching flattens the event once and walks the trie from the root; a node is reached at most
once, and only through edges the event satisfies, so rules that fail on their first selective
field are never looked at.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeAlias, TypeVar

from eventbus.rules._pattern import CompiledPattern
from eventbus.rules._pattern_ops import (
    EqualsIgnoreCase,
    Exact,
    Leaf,
    Matcher,
    Numeric,
    Prefix,
    Suffix,
)

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
        self.fields: dict[int, _FieldIndex] = {}
        # Children reached because the event has no value at a path ({"exists": false}).
        self.absent: list[tuple[int, _Node]] = []
        self.ends: list[int] = []
        # ``fields`` as the matching loop reads it (set by ``freeze``): path number, index, and
        # the index's exact-value dict when that is all it holds.
        self.edges: tuple[tuple[int, _FieldIndex, dict[object, list[_Node]] | None], ...] = ()

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
                index = self.fields[path] = _FieldIndex()
            for matcher in leaf.matchers:
                index.add(matcher, node)
            if leaf.absent_ok:
                self.absent.append((path, node))
        return node


def _add_to(table: dict[Any, list[_Node]], key: object, node: _Node) -> None:
    bucket = table.get(key)
    if bucket is None:
        table[key] = [node]
    elif node not in bucket:
        bucket.append(node)


class _FixedLength:
    """Prefixes (or suffixes) grouped by length: a value needs one slice and one dict lookup
    per distinct length, however many prefixes share that length."""

    __slots__ = ("by_length", "lengths")

    def __init__(self) -> None:
        self.by_length: dict[int, dict[str, list[_Node]]] = {}
        self.lengths: list[int] = []

    def add(self, text: str, node: _Node) -> None:
        if len(text) not in self.by_length:
            self.by_length[len(text)] = {}
            bisect.insort(self.lengths, len(text))
        _add_to(self.by_length[len(text)], text, node)

    def collect_prefixes(self, value: str, out: set[_Node]) -> None:
        for length in self.lengths:
            if length > len(value):
                break
            hit = self.by_length[length].get(value[:length])
            if hit:
                out.update(hit)

    def collect_suffixes(self, value: str, out: set[_Node]) -> None:
        for length in self.lengths:
            if length > len(value):
                break
            hit = self.by_length[length].get(value[len(value) - length :])
            if hit:
                out.update(hit)


# The four one-sided comparisons of ``_Bounds``: x > b, x >= b, x < b, x <= b.
_ABOVE, _AT_LEAST, _BELOW, _AT_MOST = range(4)


class _Bounds:
    """Numeric intervals sorted so that one bisect finds every interval holding a number.

    One-sided intervals live in four sorted tables (``x > b``, ``x >= b``, ``x < b``,
    ``x <= b``): for each, the intervals holding ``x`` are one contiguous slice, all matches.
    Two-sided ones are sorted by lower bound; only those starting at or below ``x`` are
    checked against their upper bound.
    """

    __slots__ = ("_pending", "equal", "lows", "rows", "sides")

    def __init__(self) -> None:
        self._pending: list[tuple[Numeric, _Node]] = []
        self.equal: dict[int | float, list[_Node]] = {}
        # (sorted bounds, their nodes, which of the four comparisons), non-empty tables only.
        self.sides: list[tuple[list[int | float], list[_Node], int]] = []
        self.lows: list[int | float] = []
        self.rows: list[tuple[int | float, bool, int | float, bool, _Node]] = []

    def add(self, numeric: Numeric, node: _Node) -> None:
        self._pending.append((numeric, node))

    def freeze(self) -> None:
        tables: list[list[tuple[int | float, int, _Node]]] = [[], [], [], []]
        ranges: list[tuple[int | float, int, bool, int | float, bool, _Node]] = []
        # The sequence number keeps sorting away from comparing nodes on equal bounds.
        for seq, (n, node) in enumerate(self._pending):
            if n.low is not None and n.low == n.high:
                _add_to(self.equal, n.low, node)
            elif n.high is None:
                assert n.low is not None
                tables[_ABOVE if n.low_open else _AT_LEAST].append((n.low, seq, node))
            elif n.low is None:
                tables[_BELOW if n.high_open else _AT_MOST].append((n.high, seq, node))
            else:
                ranges.append((n.low, seq, n.low_open, n.high, n.high_open, node))
        self._pending = []
        for kind, rows in enumerate(tables):
            if rows:
                rows.sort(key=lambda row: (row[0], row[1]))
                self.sides.append(([row[0] for row in rows], [row[2] for row in rows], kind))
        ranges.sort(key=lambda row: (row[0], row[1]))
        self.lows = [row[0] for row in ranges]
        self.rows = [(row[0], row[2], row[3], row[4], row[5]) for row in ranges]

    def collect(self, x: int | float, out: set[_Node]) -> None:
        if x != x:
            return  # NaN lies in no interval, but would confuse the bisects
        hit = self.equal.get(x)
        if hit:
            out.update(hit)
        for bounds, nodes, kind in self.sides:
            if kind == _ABOVE:
                out.update(nodes[: bisect.bisect_left(bounds, x)])
            elif kind == _AT_LEAST:
                out.update(nodes[: bisect.bisect_right(bounds, x)])
            elif kind == _BELOW:
                out.update(nodes[bisect.bisect_right(bounds, x) :])
            else:
                out.update(nodes[bisect.bisect_left(bounds, x) :])
        if self.lows:
            rows = self.rows
            for i in range(bisect.bisect_right(self.lows, x)):
                low, low_open, high, high_open, node = rows[i]
                # low <= x holds by the bisect.
                if (x < high or (x == high and not high_open)) and not (low_open and x == low):
                    out.add(node)


class _FieldIndex:
    """Every edge condition leaving one node on one field path, indexed by matcher kind."""

    __slots__ = (
        "exact",
        "exact_only",
        "folded",
        "folded_prefix",
        "folded_suffix",
        "folding",
        "numbers",
        "prefix",
        "residual",
        "suffix",
    )

    def __init__(self) -> None:
        self.exact: dict[object, list[_Node]] = {}
        self.folded: dict[str, list[_Node]] = {}
        self.prefix: _FixedLength | None = None
        self.suffix: _FixedLength | None = None
        self.folded_prefix: _FixedLength | None = None
        self.folded_suffix: _FixedLength | None = None
        self.numbers: _Bounds | None = None
        self.residual: list[tuple[Matcher, _Node]] = []
        # Whether case-insensitive operators, or only exact values, are indexed here: both set
        # by freeze to pick the lookup path.
        self.folding = False
        self.exact_only = False

    def add(self, matcher: Matcher, node: _Node) -> None:
        if isinstance(matcher, Exact):
            _add_to(self.exact, matcher.key, node)
        elif isinstance(matcher, EqualsIgnoreCase):
            _add_to(self.folded, matcher.text, node)
        elif isinstance(matcher, Prefix):
            if matcher.ignore_case:
                self.folded_prefix = self.folded_prefix or _FixedLength()
                self.folded_prefix.add(matcher.text, node)
            else:
                self.prefix = self.prefix or _FixedLength()
                self.prefix.add(matcher.text, node)
        elif isinstance(matcher, Suffix):
            if matcher.ignore_case:
                self.folded_suffix = self.folded_suffix or _FixedLength()
                self.folded_suffix.add(matcher.text, node)
            else:
                self.suffix = self.suffix or _FixedLength()
                self.suffix.add(matcher.text, node)
        elif isinstance(matcher, Numeric):
            self.numbers = self.numbers or _Bounds()
            self.numbers.add(matcher, node)
        else:
            self.residual.append((matcher, node))

    def freeze(self) -> None:
        if self.numbers is not None:
            self.numbers.freeze()
        self.folding = bool(self.folded or self.folded_prefix or self.folded_suffix)
        self.exact_only = not (
            self.folding or self.prefix or self.suffix or self.numbers or self.residual
        )

    def collect(self, values: list[object], out: set[_Node]) -> None:
        """Add to ``out`` every child whose edge condition some value satisfies."""
        exact = self.exact
        for value in values:
            kind = type(value)
            if kind is str:
                assert isinstance(value, str)
                hit = exact.get(value)
                if hit:
                    out.update(hit)
                if self.prefix is not None:
                    self.prefix.collect_prefixes(value, out)
                if self.suffix is not None:
                    self.suffix.collect_suffixes(value, out)
                if self.folding:
                    self._collect_folded(value.casefold(), out)
            else:
                hit = exact.get((kind, value))  # the key of ``exact_key``, inlined
                if hit:
                    out.update(hit)
                if self.numbers is not None and (kind is int or kind is float):
                    assert isinstance(value, int | float)
                    self.numbers.collect(value, out)
            for matcher, node in self.residual:
                if node not in out and matcher.test(value):
                    out.add(node)

    def _collect_folded(self, folded: str, out: set[_Node]) -> None:
        hit = self.folded.get(folded)
        if hit:
            out.update(hit)
        if self.folded_prefix is not None:
            self.folded_prefix.collect_prefixes(folded, out)
        if self.folded_suffix is not None:
            self.folded_suffix.collect_suffixes(folded, out)


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
        keys = self._keys
        return [keys[slot] for slot in sorted(set(slots))]
