"""Leaf operators of the event-pattern language: one matcher per operator, and ``Leaf``, the
condition one field of a pattern places on an event.

Rule engine, step one: ``_pattern_parse`` turns each leaf array of a pattern into a ``Leaf``;
the matchers are shared by the single-pattern evaluator (``CompiledPattern.matches``) and by the
multi-pattern index (``_index``), which looks inside the matcher types to file them in hash maps
and sorted tables. Every matcher is a frozen, hashable value so identical conditions in
different patterns share one index entry.

A matcher tests one leaf value of the event: a ``str``, ``int``, ``float``, ``bool`` or ``None``
as parsed from JSON. Objects and arrays are never leaf values; the caller flattens them.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = [
    "AnythingBut",
    "Cidr",
    "EqualsIgnoreCase",
    "Exact",
    "Exists",
    "IpNetwork",
    "Leaf",
    "Matcher",
    "Numeric",
    "Prefix",
    "Scalar",
    "Suffix",
    "Wildcard",
    "exact_key",
    "ip_address_of",
    "is_number",
]

Scalar: TypeAlias = str | int | float | bool | None


def is_number(value: object) -> bool:
    """True for JSON numbers; ``bool`` is an ``int`` subclass in Python but not a JSON number."""
    return type(value) is int or type(value) is float


def exact_key(value: object) -> object:
    """The hash key under which a leaf value is compared for exact equality.

    Strings are their own key (the common case stays a plain dict lookup). Other scalars are
    tagged with their kind, so that Python's ``True == 1`` does not leak into matching; an
    integer is tagged as a float is: JSON ``300``, ``300.0`` and ``3e2`` are one number, equal
    in an exact match as in EventBridge, whose matcher compares a pattern's numbers by value as
    well as by text. (Python compares an int and a float exactly, and hashes equal ones alike:
    ``2**63 + 1`` is not the float nearest it.)
    """
    kind = type(value)
    if kind is str:
        return value
    return (float if kind is int else kind, value)


@dataclass(frozen=True, slots=True)
class Exact:
    """``"x"``, ``5``, ``true``, ``null``: the leaf value equals this one (same JSON type;
    numbers by value).

    Equality and hashing go by ``key`` alone: as plain values ``1``, ``1.0`` and ``true`` would
    be one dict key and two different conditions would share one index edge.
    """

    key: object
    value: Scalar = field(compare=False)

    @classmethod
    def of(cls, value: Scalar) -> Exact:
        return cls(exact_key(value), value)

    def test(self, value: object) -> bool:
        return exact_key(value) == self.key


@dataclass(frozen=True, slots=True)
class Prefix:
    """``{"prefix": "x"}``; ``text`` is already case-folded when ``ignore_case``."""

    text: str
    ignore_case: bool

    def test(self, value: object) -> bool:
        if type(value) is not str:
            return False
        return (value.casefold() if self.ignore_case else value).startswith(self.text)


@dataclass(frozen=True, slots=True)
class Suffix:
    """``{"suffix": "x"}``; ``text`` is already case-folded when ``ignore_case``."""

    text: str
    ignore_case: bool

    def test(self, value: object) -> bool:
        if type(value) is not str:
            return False
        return (value.casefold() if self.ignore_case else value).endswith(self.text)


@dataclass(frozen=True, slots=True)
class EqualsIgnoreCase:
    """``{"equals-ignore-case": "x"}``; ``text`` is case-folded."""

    text: str

    def test(self, value: object) -> bool:
        return type(value) is str and value.casefold() == self.text


@dataclass(frozen=True, slots=True)
class Wildcard:
    """``{"wildcard": "a*b"}``: ``*`` stands for any run of characters, ``\\*`` for a star."""

    source: str
    pieces: tuple[str, ...] = field(compare=False, repr=False)
    """The literal text between the stars (one piece: no star)."""

    def test(self, value: object) -> bool:
        # The pieces in order, each at its leftmost place: right for stars alone, and at most
        # one pass of str.find per piece. A regular expression (".*" per star) backtracked:
        # "*/*/*/*.jpg" took 34 s on a subject of 1,000 slashes, routing stopped meanwhile.
        if type(value) is not str:
            return False
        pieces = self.pieces
        first = pieces[0]
        if len(pieces) == 1:
            return value == first
        last = pieces[-1]
        end = len(value) - len(last)
        if end < len(first) or not value.startswith(first) or not value.endswith(last):
            return False
        at = len(first)
        for piece in pieces[1:-1]:
            found = value.find(piece, at, end)
            if found < 0:
                return False
            at = found + len(piece)
        return True


@dataclass(frozen=True, slots=True)
class Numeric:
    """``{"numeric": [...]}``: a closed, open or half-open interval; ``None`` is unbounded.

    ``"="`` is the interval ``[x, x]``, so ``300`` and ``300.0`` are equal here (unlike ``Exact``).
    """

    low: int | float | None
    low_open: bool
    high: int | float | None
    high_open: bool

    def test(self, value: object) -> bool:
        # NaN (which Python's json module, unlike JSON, lets through) compares as nothing.
        if not is_number(value) or value != value:
            return False
        assert isinstance(value, int | float)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.high_open else value > self.high)
        )


IpNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Cidr:
    """``{"cidr": "10.0.0.0/24"}``: a string leaf holding an IPv4/IPv6 address in the block."""

    network: IpNetwork

    def test(self, value: object) -> bool:
        if type(value) is not str:
            return False
        address = ip_address_of(value)
        # Containment across IP versions is simply False in the stdlib.
        return address is not None and address in self.network


@functools.lru_cache(maxsize=4096)
def ip_address_of(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``value`` read as an IP address once for all the blocks of a field it is tested against
    (each parsed it again: 3,000 blocks took 5.9 ms an event), or None."""
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Exists:
    """``{"exists": true}``: any leaf value at all, ``null`` included."""

    def test(self, value: object) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class AnythingBut:
    """``{"anything-but": ...}``: a present leaf value that is none of the excluded ones.

    Excluded numbers compare numerically; ``inner`` holds string operators (prefix, suffix,
    equals-ignore-case, wildcard) whose matches are excluded too. Values of another type than
    the excluded ones (``null``, booleans, a number against excluded strings) always match.
    """

    strings: frozenset[str]
    numbers: frozenset[int | float]
    inner: tuple[Prefix | Suffix | EqualsIgnoreCase | Wildcard, ...]

    def test(self, value: object) -> bool:
        if type(value) is str:
            return value not in self.strings and not any(m.test(value) for m in self.inner)
        if is_number(value):
            return value not in self.numbers
        return True


Matcher: TypeAlias = (
    Exact | Prefix | Suffix | EqualsIgnoreCase | Wildcard | Numeric | Cidr | Exists | AnythingBut
)


@dataclass(frozen=True, slots=True)
class Leaf:
    """One field condition: the leaf array of alternatives under one field path.

    It holds when any leaf value at ``path`` satisfies any matcher, or, with ``absent_ok``
    (``{"exists": false}`` among the alternatives), when the event has no leaf value there.
    """

    path: tuple[str, ...]
    matchers: tuple[Matcher, ...]
    absent_ok: bool
    # The exact values as one set, the other matchers apart: a leaf of 600 values tested one
    # matcher at a time against an array of 100 cost 60,000 tests per event.
    exact: frozenset[object] = field(init=False, compare=False, repr=False)
    others: tuple[Matcher, ...] = field(init=False, compare=False, repr=False)
    # Computed once: leaves key the index's drafts and a pattern test's memo, per event.
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        exact = frozenset(m.key for m in self.matchers if type(m) is Exact)
        object.__setattr__(self, "exact", exact)
        object.__setattr__(self, "others", tuple(m for m in self.matchers if type(m) is not Exact))
        object.__setattr__(self, "_hash", hash((self.path, self.matchers, self.absent_ok)))

    def __hash__(self) -> int:
        return self._hash

    def holds(self, value: object) -> bool:
        """Whether one leaf value satisfies one of the matchers."""
        return exact_key(value) in self.exact or any(m.test(value) for m in self.others)

    def test(self, values: list[object]) -> bool:
        if not values:
            return self.absent_ok
        return any(self.holds(v) for v in values)
