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

Arrays are matched as EventBridge matches them ("array consistency"): a field under an array
matches if any element does, and the fields of one pattern that lie under the same array must
be matched by the same element of it. Each leaf value therefore comes with its *membership*:
for every array on its way down, which array (``id`` of the list, stable while one event is
matched) and which position. Values whose memberships name the same array at different
positions cannot be used together.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from eventbus._errors import PatternError
from eventbus.rules._pattern_ops import Leaf, exact_key
from eventbus.rules._pattern_parse import parse_leaf

__all__ = [
    "MAX_ALTERNATIVES",
    "CompiledPattern",
    "Membership",
    "Memo",
    "compile_pattern",
    "consistent",
    "matches",
    "members_at",
    "values_at",
]

# "$or" multiplies out into alternatives for the index; this bounds the blow-up of many
# parallel "$or"s (each alternative costs index memory) while leaving real patterns alone.
MAX_ALTERNATIVES = 1024
# Deeper patterns than any real event shape are refused rather than risking recursion limits.
_MAX_DEPTH = 32

# Values at one path from which a condition of exact values looks them up (see Memo.fitting).
_LOOKUP_FROM = 16

Membership = tuple[tuple[int, int], ...]
"""Where a leaf value sits in the event's arrays: ``(array id, position)`` per array crossed."""
_TOP: Membership = ()


class Memo:
    """What testing patterns against one event found, for the next pattern tested against it:
    the values at each path, the values each condition holds for (equal conditions of
    different patterns share them), and each conjunction's verdict. A leaf outside every
    "$or" is in each of up to 1,024 alternatives, and 300 rules testing the same fields of
    an array of 3,000 elements each walked it again (14 s for one event)."""

    __slots__ = ("by_value", "decided", "found", "tested")

    def __init__(self) -> None:
        self.found: dict[tuple[str, ...], list[tuple[object, Membership]]] = {}
        self.tested: dict[Leaf, list[Membership]] = {}
        self.decided: dict[tuple[Leaf, ...], bool] = {}
        # per path with many values, the memberships of each value (by its exact key)
        self.by_value: dict[tuple[str, ...], dict[object, list[Membership]]] = {}

    def fitting(self, leaf: Leaf, members: list[tuple[object, Membership]]) -> list[Membership]:
        """The memberships of the values at ``leaf``'s path that it holds for, once each.
        Exact values only, among many values: looked up (300 rules each naming another value
        of one field of an array of 3,000 elements tested 900,000 values)."""
        if leaf.others or len(members) < _LOOKUP_FROM:
            holds = leaf.holds
            return list(dict.fromkeys(m for v, m in members if holds(v)))
        table = self.by_value.get(leaf.path)
        if table is None:
            table = self.by_value[leaf.path] = {}
            for value, membership in members:
                table.setdefault(exact_key(value), []).append(membership)
        fits: list[Membership] = []
        for key in leaf.exact:
            fits.extend(table.get(key, ()))
        return list(dict.fromkeys(fits))


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

    def matches(self, event: dict[str, Any], memo: Memo | None = None) -> bool:
        """True when ``event`` satisfies the pattern; never raises for any JSON-shaped event.

        The reference semantics the index must agree with: some conjunction of
        ``alternatives`` has, for every condition, a value satisfying it (or, for
        ``{"exists": false}``, no value), and the chosen values are array-consistent.
        ``memo``: what testing other patterns against the same event found, shared (see
        :class:`Memo`).
        """
        if memo is None:
            memo = Memo()
        found, tested, decided = memo.found, memo.tested, memo.decided
        for conjunction in self.alternatives:
            verdict = decided.get(conjunction)
            if verdict is not None:
                if verdict:
                    return True
                continue
            options: list[list[Membership]] = []
            for leaf in conjunction:
                members = found.get(leaf.path)
                if members is None:
                    members = found[leaf.path] = members_at(event, leaf.path)
                if not members:
                    if not leaf.absent_ok:
                        break
                    options.append([_TOP])
                    continue
                fits = tested.get(leaf)
                if fits is None:
                    fits = tested[leaf] = memo.fitting(leaf, members)
                if not fits:
                    break
                options.append(fits)
            else:
                verdict = len(options) < 2 or _choose(sorted(_shared(options), key=len), {})
                decided[conjunction] = verdict
                if verdict:
                    return True
                continue
            decided[conjunction] = False
        return False

    def mismatch(self, event: dict[str, Any]) -> str | None:
        """Why ``event`` does not match (None when it does), for people trying events: the
        first field condition of each alternative that no value satisfies. Slower than
        ``matches``; never raises for any JSON-shaped event."""
        if self.matches(event):
            return None
        reasons = []
        for conjunction in self.alternatives:
            reason = "values in different elements of the same array"
            for leaf in conjunction:
                members = members_at(event, leaf.path)
                field = ".".join(leaf.path)
                if not members and not leaf.absent_ok:
                    reason = f"{field}: absent"
                    break
                if members and not any(leaf.holds(v) for v, _ in members):
                    shown = [v for v, _ in members[:3]]
                    value = shown[0] if len(shown) == 1 else shown
                    reason = f"{field}: {_short(value)} does not match"
                    break
            reasons.append(reason)
        unique = list(dict.fromkeys(reasons))
        if len(self.alternatives) > 1:
            return "no $or branch matched: " + "; ".join(unique)
        return unique[0]


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def consistent(constraint: dict[int, int], membership: Membership) -> dict[int, int] | None:
    """``constraint`` (array id -> position) extended by ``membership``, or None when they
    place the same array at different positions. Returns ``constraint`` itself (not a copy)
    when the membership adds nothing."""
    added = None
    for array, position in membership:
        held = constraint.get(array)
        if held is None:
            if added is None:
                added = dict(constraint)
            added[array] = position
        elif held != position:
            return None
    return constraint if added is None else added


def _shared(options: list[list[Membership]]) -> list[list[Membership]]:
    """``options`` with only the arrays that more than one of them crosses: an array one
    field alone lies under cannot make two choices inconsistent. Without this, a field with
    values in an array of its own offered one choice per value, and the choices multiplied
    (m^(k-1) for k fields of m values: seconds for an event of 3 KB)."""
    crossing: dict[int, int] = {}
    for fits in options:
        for array in {array for membership in fits for array, _ in membership}:
            crossing[array] = crossing.get(array, 0) + 1
    shared = {array for array, count in crossing.items() if count > 1}
    return [
        list(dict.fromkeys(tuple(p for p in membership if p[0] in shared) for membership in fits))
        for fits in options
    ]


def _choose(options: list[list[Membership]], constraint: dict[int, int]) -> bool:
    """Whether one membership per entry of ``options`` can be picked, all consistent. Each
    entry's memberships are looked up by the array positions already chosen: tried one by
    one, two fields in different elements of one array of n tried n^2/4 pairs (18 s for an
    event of 210 KB, the router held meanwhile)."""
    return _pick([_Places(fits) for fits in options], 0, constraint)


def _pick(options: list[_Places], at: int, constraint: dict[int, int]) -> bool:
    if at == len(options):
        return True
    for membership in options[at].fitting(constraint):
        extended = consistent(constraint, membership)
        if extended is not None and _pick(options, at + 1, extended):
            return True
    return False


class _Places:
    """The memberships of one field's fitting values, found by an array position they take
    (and, for each array, those not under it: they fit any of its positions)."""

    def __init__(self, fits: list[Membership]) -> None:
        self.fits = fits
        self._at: dict[tuple[int, int], list[Membership]] = {}
        self._under: dict[int, int] = {}  # array -> how many memberships lie under it
        for membership in fits:
            for place in membership:
                self._at.setdefault(place, []).append(membership)
                self._under[place[0]] = self._under.get(place[0], 0) + 1
        self._outside: dict[int, list[Membership]] = {}

    def fitting(self, constraint: dict[int, int]) -> list[Membership]:
        """A list holding every membership consistent with ``constraint`` (and perhaps some
        others, ruled out by ``consistent``): the shortest that one chosen array gives. Only
        the chosen arrays this field lies under are looked at, and the memberships outside an
        array are listed only for the array picked (for every array, with arrays nested in
        an array's elements, it was quadratic again, in time and memory)."""
        best, size = None, len(self.fits)
        for array, position in constraint.items():
            under = self._under.get(array)
            if under is None:
                continue
            found = len(self._at.get((array, position), ())) + len(self.fits) - under
            if found < size:
                best, size = (array, position), found
        if best is None:
            return self.fits
        array, position = best
        outside = self._outside.get(array)
        if outside is None:
            outside = [m for m in self.fits if all(a != array for a, _ in m)]
            self._outside[array] = outside
        return self._at.get(best, []) + outside


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
        try:
            if key == "$or":
                any_of.append(_compile_or(spec, prefix, at, depth + 1))
            elif isinstance(spec, dict):
                sub = _compile_object(spec, (*prefix, key), at, depth=depth + 1)
                leaves.extend(sub.leaves)
                any_of.extend(sub.any_of)
            else:
                leaves.append(parse_leaf(spec, (*prefix, key), at))
        except PatternError as exc:
            exc.within(key)
            raise
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
        try:
            if not isinstance(sub, dict):
                raise PatternError("each $or alternative must be a pattern object", path=at)
            subs.append(_compile_object(sub, prefix, at, depth=depth))
        except PatternError as exc:
            exc.within(i)
            raise
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
    """Every leaf value of ``event`` at ``path`` (arrays crossed and flattened, objects are not
    leaves); an empty list means the field is absent."""
    return [value for value, _ in members_at(event, path)]


def members_at(event: dict[str, Any], path: tuple[str, ...]) -> list[tuple[object, Membership]]:
    """Every leaf value of ``event`` at ``path`` with its membership in the event's arrays, in
    document order: arrays (also arrays of objects, and arrays of arrays) are crossed, objects
    are not leaves. An empty list means the field is absent."""
    current: list[tuple[object, Membership]] = [(event, _TOP)]
    for key in path:
        following: list[tuple[object, Membership]] = []
        for node, membership in _expand(current):
            if isinstance(node, dict) and key in node:
                following.append((node[key], membership))
        if not following:
            return []
        current = following
    return [(v, m) for v, m in _expand(current) if not isinstance(v, dict)]


def _expand(nodes: list[tuple[object, Membership]]) -> list[tuple[object, Membership]]:
    """``nodes`` with arrays (at any depth) replaced by their elements, each element's
    membership extended by its array and position; without recursion."""
    out: list[tuple[object, Membership]] = []
    stack = list(reversed(nodes))
    while stack:
        node, membership = stack.pop()
        if isinstance(node, list):
            array = id(node)
            stack.extend(
                (element, (*membership, (array, position)))
                for position, element in reversed(list(enumerate(node)))
            )
        else:
            out.append((node, membership))
    return out
