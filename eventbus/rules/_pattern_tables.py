"""The lookup tables of the pattern index: for one field at one trie node, every leaf value is
mapped to the child nodes whose edge condition it satisfies, without testing conditions one by
one where a hash lookup or a bisection can answer.

Rule engine, step two (with ``_index``, which owns the trie): exact values and case-folded
values in dicts, prefixes and suffixes in dicts by length, numeric intervals in sorted bound
tables; wildcards filed by their literal start or end and tested only when the value has it;
cidr blocks in dicts by prefix length; only anything-but, exists and wildcards that start and
end with a star stay in a residual list tested in turn.
The tables are generic in the node type so that they know nothing of the trie.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from eventbus.rules._pattern_ops import (
    Cidr,
    EqualsIgnoreCase,
    Exact,
    IpNetwork,
    Matcher,
    Numeric,
    Prefix,
    Suffix,
    Wildcard,
    exact_key,
    ip_address_of,
)

__all__ = ["Blocks", "Bounds", "FieldIndex", "FixedLength", "Wildcards", "add_to"]

N = TypeVar("N", bound=Hashable)


def add_to(table: dict[Any, list[N]], key: object, node: N) -> None:
    """File ``node`` under ``key``, once: a lookup then yields each node at most once."""
    bucket = table.get(key)
    if bucket is None:
        table[key] = [node]
    elif node not in bucket:
        bucket.append(node)


class FixedLength(Generic[N]):
    """Prefixes (or suffixes) grouped by length: a value needs one slice and one dict lookup
    per distinct length, however many prefixes share that length."""

    __slots__ = ("by_length", "lengths")

    def __init__(self) -> None:
        self.by_length: dict[int, dict[str, list[N]]] = {}
        self.lengths: list[int] = []

    def add(self, text: str, node: N) -> None:
        if len(text) not in self.by_length:
            self.by_length[len(text)] = {}
            bisect.insort(self.lengths, len(text))
        add_to(self.by_length[len(text)], text, node)

    def collect_prefixes(self, value: str, out: set[N]) -> None:
        for length in self.lengths:
            if length > len(value):
                break
            hit = self.by_length[length].get(value[:length])
            if hit:
                out.update(hit)

    def collect_suffixes(self, value: str, out: set[N]) -> None:
        for length in self.lengths:
            if length > len(value):
                break
            hit = self.by_length[length].get(value[len(value) - length :])
            if hit:
                out.update(hit)


class Wildcards(Generic[N]):
    """Wildcards filed by the literal text before their first star (or, when they start with
    one, after their last): a value is tested only against those whose start or end it has,
    not against every wildcard of the field (3,000 of them on an array of 500 values took 1.6 s
    an event when each was tried in turn). ``*x*`` has neither and is tried on every value."""

    __slots__ = ("by_end", "by_start", "rest")

    def __init__(self) -> None:
        self.by_start: FixedLength[tuple[Wildcard, N]] = FixedLength()
        self.by_end: FixedLength[tuple[Wildcard, N]] = FixedLength()
        self.rest: list[tuple[Wildcard, N]] = []

    def add(self, wildcard: Wildcard, node: N) -> None:
        first, last = wildcard.pieces[0], wildcard.pieces[-1]
        if first:
            self.by_start.add(first, (wildcard, node))
        elif last:
            self.by_end.add(last, (wildcard, node))
        else:
            self.rest.append((wildcard, node))

    def collect(self, value: str, out: set[N]) -> None:
        candidates: set[tuple[Wildcard, N]] = set()
        if self.by_start.lengths:
            self.by_start.collect_prefixes(value, candidates)
        if self.by_end.lengths:
            self.by_end.collect_suffixes(value, candidates)
        for wildcard, node in candidates:
            if node not in out and wildcard.test(value):
                out.add(node)
        for wildcard, node in self.rest:
            if node not in out and wildcard.test(value):
                out.add(node)


class Blocks(Generic[N]):
    """CIDR blocks in one dict per IP version and prefix length, keyed by the network address:
    an address needs one mask and one lookup per distinct prefix length, however many blocks
    share it (each block was tested in turn)."""

    __slots__ = ("lengths", "tables")

    def __init__(self) -> None:
        # (version, prefix length) -> network address as an integer -> nodes
        self.tables: dict[tuple[int, int], dict[int, list[N]]] = {}
        self.lengths: dict[int, list[int]] = {4: [], 6: []}

    def add(self, network: IpNetwork, node: N) -> None:
        key = (network.version, network.prefixlen)
        if key not in self.tables:
            self.tables[key] = {}
            bisect.insort(self.lengths[network.version], network.prefixlen)
        add_to(self.tables[key], int(network.network_address), node)

    def collect(self, value: str, out: set[N]) -> None:
        address = ip_address_of(value)
        if address is None:
            return
        version, bits, number = address.version, address.max_prefixlen, int(address)
        for length in self.lengths[version]:
            host_bits = bits - length
            hit = self.tables[version, length].get(number >> host_bits << host_bits)
            if hit:
                out.update(hit)


# The four one-sided comparisons of ``Bounds``: x > b, x >= b, x < b, x <= b.
_ABOVE, _AT_LEAST, _BELOW, _AT_MOST = range(4)


class Bounds(Generic[N]):
    """Numeric intervals sorted so that one bisect finds every interval holding a number.

    One-sided intervals live in four sorted tables (``x > b``, ``x >= b``, ``x < b``,
    ``x <= b``): for each, the intervals holding ``x`` are one contiguous slice, all matches.
    Two-sided ones are sorted by lower bound; only those starting at or below ``x`` are
    checked against their upper bound.
    """

    __slots__ = ("_pending", "equal", "lows", "rows", "sides")

    def __init__(self) -> None:
        self._pending: list[tuple[Numeric, N]] = []
        self.equal: dict[int | float, list[N]] = {}
        # (sorted bounds, their nodes, which of the four comparisons), non-empty tables only.
        self.sides: list[tuple[list[int | float], list[N], int]] = []
        self.lows: list[int | float] = []
        self.rows: list[tuple[int | float, bool, int | float, bool, N]] = []

    def add(self, numeric: Numeric, node: N) -> None:
        self._pending.append((numeric, node))

    def freeze(self) -> None:
        tables: list[list[tuple[int | float, int, N]]] = [[], [], [], []]
        ranges: list[tuple[int | float, int, bool, int | float, bool, N]] = []
        # The sequence number keeps sorting away from comparing nodes on equal bounds.
        for seq, (n, node) in enumerate(self._pending):
            if n.low is not None and n.low == n.high:
                add_to(self.equal, n.low, node)
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

    def collect(self, x: int | float, out: set[N]) -> None:
        if x != x:
            return  # NaN lies in no interval, but would confuse the bisects
        if self.equal:
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


class FieldIndex(Generic[N]):
    """Every edge condition leaving one node on one field path, indexed by matcher kind."""

    __slots__ = (
        "blocks",
        "exact",
        "exact_only",
        "folded",
        "folded_prefix",
        "folded_suffix",
        "folding",
        "numbers",
        "prefix",
        "residual",
        "string_steps",
        "suffix",
        "wildcards",
    )

    def __init__(self) -> None:
        self.exact: dict[object, list[N]] = {}
        self.folded: dict[str, list[N]] = {}
        self.prefix: FixedLength[N] | None = None
        self.suffix: FixedLength[N] | None = None
        self.folded_prefix: FixedLength[N] | None = None
        self.folded_suffix: FixedLength[N] | None = None
        self.numbers: Bounds[N] | None = None
        self.wildcards: Wildcards[N] | None = None
        self.blocks: Blocks[N] | None = None
        self.residual: list[tuple[Matcher, N]] = []
        # Set by freeze to pick the lookup path: whether case-insensitive operators, or only
        # exact values, are indexed here, and the lookups a string value goes through.
        self.folding = False
        self.exact_only = False
        self.string_steps: tuple[Callable[[str, set[N]], None], ...] = ()

    def add(self, matcher: Matcher, node: N) -> None:
        if isinstance(matcher, Exact):
            add_to(self.exact, matcher.key, node)
        elif isinstance(matcher, EqualsIgnoreCase):
            add_to(self.folded, matcher.text, node)
        elif isinstance(matcher, Prefix):
            if matcher.ignore_case:
                self.folded_prefix = self.folded_prefix or FixedLength()
                self.folded_prefix.add(matcher.text, node)
            else:
                self.prefix = self.prefix or FixedLength()
                self.prefix.add(matcher.text, node)
        elif isinstance(matcher, Suffix):
            if matcher.ignore_case:
                self.folded_suffix = self.folded_suffix or FixedLength()
                self.folded_suffix.add(matcher.text, node)
            else:
                self.suffix = self.suffix or FixedLength()
                self.suffix.add(matcher.text, node)
        elif isinstance(matcher, Numeric):
            self.numbers = self.numbers or Bounds()
            self.numbers.add(matcher, node)
        elif isinstance(matcher, Wildcard):
            self.wildcards = self.wildcards or Wildcards()
            self.wildcards.add(matcher, node)
        elif isinstance(matcher, Cidr):
            self.blocks = self.blocks or Blocks()
            self.blocks.add(matcher.network, node)
        else:
            self.residual.append((matcher, node))

    def freeze(self) -> None:
        if self.numbers is not None:
            self.numbers.freeze()
        self.folding = bool(self.folded or self.folded_prefix or self.folded_suffix)
        self.exact_only = not (
            self.folding
            or self.prefix
            or self.suffix
            or self.numbers
            or self.wildcards
            or self.blocks
            or self.residual
        )
        steps: list[Callable[[str, set[N]], None]] = []
        if self.prefix is not None:
            steps.append(self.prefix.collect_prefixes)
        if self.suffix is not None:
            steps.append(self.suffix.collect_suffixes)
        if self.folding:
            steps.append(self._collect_folded)
        if self.wildcards is not None:
            steps.append(self.wildcards.collect)
        if self.blocks is not None:
            steps.append(self.blocks.collect)
        self.string_steps = tuple(steps)

    def collect(self, value: object, out: set[N]) -> None:
        """Add to ``out`` every child whose edge condition the leaf ``value`` satisfies."""
        if self.exact:
            hit = self.exact.get(value if type(value) is str else exact_key(value))
            if hit:
                out.update(hit)
        # Exact types, as the matchers test them: ``bool`` is an ``int`` but no JSON number.
        if type(value) is str:
            for step in self.string_steps:
                step(value, out)
        elif self.numbers is not None and (type(value) is int or type(value) is float):
            self.numbers.collect(value, out)
        for matcher, node in self.residual:
            if node not in out and matcher.test(value):
                out.add(node)

    def _collect_folded(self, value: str, out: set[N]) -> None:
        folded = value.casefold()
        hit = self.folded.get(folded)
        if hit:
            out.update(hit)
        if self.folded_prefix is not None:
            self.folded_prefix.collect_prefixes(folded, out)
        if self.folded_suffix is not None:
            self.folded_suffix.collect_suffixes(folded, out)
