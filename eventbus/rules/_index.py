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
from typing import Any, Generic, TypeVar

from eventbus.rules._pattern import CompiledPattern, flatten
from eventbus.rules._pattern_ops import (
    EqualsIgnoreCase,
    Exact,
    Leaf,
    Matcher,
    Numeric,
    Prefix,
    Suffix,
    exact_key,
    is_number,
)

__all__ = ["PatternIndex"]

K = TypeVar("K", bound=Hashable)


class _Node:
    """A trie node: conditions leading further (per path), and the entries that end here."""

    __slots__ = ("absent", "children", "ends", "fields")

    def __init__(self) -> None:
        self.children: dict[Leaf, _Node] = {}
        self.fields: dict[tuple[str, ...], _FieldIndex] = {}
        # Children reached because the event has no value at a path ({"exists": false}).
        self.absent: list[tuple[tuple[str, ...], _Node]] = []
        self.ends: list[int] = []

    def child(self, leaf: Leaf) -> _Node:
        node = self.children.get(leaf)
        if node is None:
            node = self.children[leaf] = _Node()
            index = self.fields.get(leaf.path)
            if index is None:
                index = self.fields[leaf.path] = _FieldIndex()
            for matcher in leaf.matchers:
                index.add(matcher, node)
            if leaf.absent_ok:
                self.absent.append((leaf.path, node))
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


class _Bounds:
    """Numeric intervals sorted so that one bisect finds every interval holding a number.

    One-sided intervals are answered by a contiguous slice of a sorted table (all of it
    matches); two-sided ones are sorted by lower bound and only those starting at or below
    the number are checked against their upper bound.
    """

    __slots__ = ("_pending", "above", "above_eq", "below", "below_eq", "equal", "ranges")

    def __init__(self) -> None:
        self._pending: list[tuple[Numeric, _Node]] = []
        self.equal: dict[int | float, list[_Node]] = {}
        self.above: tuple[list[int | float], list[_Node]] = ([], [])
        self.above_eq: tuple[list[int | float], list[_Node]] = ([], [])
        self.below: tuple[list[int | float], list[_Node]] = ([], [])
        self.below_eq: tuple[list[int | float], list[_Node]] = ([], [])
        self.ranges: tuple[list[int | float], list[tuple[Numeric, _Node]]] = ([], [])

    def add(self, numeric: Numeric, node: _Node) -> None:
        self._pending.append((numeric, node))

    def freeze(self) -> None:
        above: list[tuple[int | float, int, _Node]] = []
        above_eq: list[tuple[int | float, int, _Node]] = []
        below: list[tuple[int | float, int, _Node]] = []
        below_eq: list[tuple[int | float, int, _Node]] = []
        ranges: list[tuple[int | float, int, Numeric, _Node]] = []
        # The sequence number keeps sorting away from comparing nodes on equal bounds.
        for seq, (n, node) in enumerate(self._pending):
            if n.low is not None and n.low == n.high:
                _add_to(self.equal, n.low, node)
            elif n.high is None:
                assert n.low is not None
                (above if n.low_open else above_eq).append((n.low, seq, node))
            elif n.low is None:
                (below if n.high_open else below_eq).append((n.high, seq, node))
            else:
                ranges.append((n.low, seq, n, node))
        self._pending = []
        for target, rows in (
            (self.above, above),
            (self.above_eq, above_eq),
            (self.below, below),
            (self.below_eq, below_eq),
        ):
            rows.sort(key=lambda row: (row[0], row[1]))
            target[0].extend(row[0] for row in rows)
            target[1].extend(row[2] for row in rows)
        ranges.sort(key=lambda row: (row[0], row[1]))
        self.ranges[0].extend(row[0] for row in ranges)
        self.ranges[1].extend((row[2], row[3]) for row in ranges)

    def collect(self, x: int | float, out: set[_Node]) -> None:
        hit = self.equal.get(x)
        if hit:
            out.update(hit)
        bounds, nodes = self.above
        if bounds:
            out.update(nodes[: bisect.bisect_left(bounds, x)])
        bounds, nodes = self.above_eq
        if bounds:
            out.update(nodes[: bisect.bisect_right(bounds, x)])
        bounds, nodes = self.below
        if bounds:
            out.update(nodes[bisect.bisect_right(bounds, x) :])
        bounds, nodes = self.below_eq
        if bounds:
            out.update(nodes[bisect.bisect_left(bounds, x) :])
        lows, rows = self.ranges
        for i in range(bisect.bisect_right(lows, x)):
            numeric, node = rows[i]
            if node not in out and numeric.test(x):
                out.add(node)


class _FieldIndex:
    """Every edge condition leaving one node on one field path, indexed by matcher kind."""

    __slots__ = (
        "exact",
        "folded",
        "folded_prefix",
        "folded_suffix",
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

    def collect(self, values: list[object], out: set[_Node]) -> None:
        """Add to ``out`` every child whose edge condition some value satisfies."""
        for value in values:
            hit = self.exact.get(exact_key(value))
            if hit:
                out.update(hit)
            if type(value) is str:
                if self.prefix is not None:
                    self.prefix.collect_prefixes(value, out)
                if self.suffix is not None:
                    self.suffix.collect_suffixes(value, out)
                if self.folded or self.folded_prefix is not None or self.folded_suffix is not None:
                    folded = value.casefold()
                    hit = self.folded.get(folded)
                    if hit:
                        out.update(hit)
                    if self.folded_prefix is not None:
                        self.folded_prefix.collect_prefixes(folded, out)
                    if self.folded_suffix is not None:
                        self.folded_suffix.collect_suffixes(folded, out)
            elif self.numbers is not None and is_number(value):
                assert isinstance(value, int | float)
                self.numbers.collect(value, out)
            for matcher, node in self.residual:
                if node not in out and matcher.test(value):
                    out.add(node)


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


class PatternIndex(Generic[K]):
    """An immutable index of compiled patterns, each under a key (typically a rule name).

    Several entries may share a key (a rule with several patterns); the key then matches when
    any of them does.
    """

    def __init__(self, entries: Iterable[tuple[K, CompiledPattern]]) -> None:
        """Build the index; never raises for compiled patterns (they are already valid)."""
        self._keys: list[K] = []
        slot_of: dict[K, int] = {}
        self._root = _Node()
        wanted: set[tuple[str, ...]] = set()
        for key, pattern in entries:
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = len(self._keys)
                self._keys.append(key)
            for conjunction in pattern.alternatives:
                node = self._root
                for leaf in sorted(conjunction, key=lambda c: (_rank(c), c.path)):
                    node = node.child(leaf)
                    wanted.update(leaf.path[:i] for i in range(1, len(leaf.path) + 1))
                if slot not in node.ends:
                    node.ends.append(slot)
        self._wanted = frozenset(wanted)
        self._freeze()

    def _freeze(self) -> None:
        stack = [self._root]
        while stack:
            node = stack.pop()
            for index in node.fields.values():
                index.freeze()
            stack.extend(node.children.values())

    def __len__(self) -> int:
        """The number of distinct keys."""
        return len(self._keys)

    def match(self, event: dict[str, Any]) -> list[K]:
        """Keys of every pattern ``event`` matches, each once, in first-insertion order.

        Agrees with testing each pattern's ``matches`` in turn; never raises for a JSON-shaped
        event (unexpected shapes simply do not match).
        """
        values = flatten(event, self._wanted)
        slots: set[int] = set()
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.ends:
                slots.update(node.ends)
            following: set[_Node] = set()
            for path, index in node.fields.items():
                found = values.get(path)
                if found:
                    index.collect(found, following)
            for path, child in node.absent:
                if path not in values:
                    following.add(child)
            stack.extend(following)
        return [self._keys[slot] for slot in sorted(slots)]
