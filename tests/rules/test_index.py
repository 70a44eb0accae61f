"""``PatternIndex`` must agree with matching each pattern on its own: checked on hand-picked
cases and on many seeded random patterns and events (bounded, reproducible)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from eventbus.rules import _index, _pattern
from eventbus.rules._index import PatternIndex
from eventbus.rules._pattern import CompiledPattern, compile_pattern
from eventbus.rules._pattern_ops import Cidr, Wildcard

STRINGS = [
    *["a", "ab", "abc", "b", "B", "ba", "x.png", "X.PNG", "", "x*", "aab"],
    *["10.0.0.7", "10.0.0.4", "11.2.3.4", "2001:db8::1", "::ffff:10.0.0.7", "not.an.ip"],
]
NUMBERS: list[int | float] = [0, 1, 1.0, 2, 2.5, 5, 10, -1, 300, 300.0, 1e9]
SCALARS: list[Any] = [*STRINGS, *NUMBERS, True, False, None]
PATHS = [
    ("source",),
    ("type",),
    ("data", "a"),
    ("data", "b"),
    ("data", "n"),
    ("data", "ip"),
    ("data", "items", "sku"),
    ("data", "items", "qty"),
]


def _operator(rng: random.Random) -> Any:
    text = rng.choice(STRINGS)
    number = rng.choice(NUMBERS)
    choice = rng.randrange(16)
    if choice == 0:
        return {"prefix": text}
    if choice == 1:
        return {"prefix": {"equals-ignore-case": text}}
    if choice == 2:
        return {"suffix": text}
    if choice == 3:
        return {"suffix": {"equals-ignore-case": text}}
    if choice == 4:
        return {"equals-ignore-case": text}
    if choice == 5:
        wildcards = ["*", "a*", "*b", "a*c", "*.png", "x\\*", "ab*", "*a*", "b*a", "10.*.7", "ab"]
        return {"wildcard": rng.choice(wildcards)}
    if choice == 6:
        op = rng.choice(["=", "<", "<=", ">", ">="])
        return {"numeric": [op, number]}
    if choice == 7:
        low, high = sorted(rng.sample([-1, 0, 1, 2, 2.5, 5, 10, 300], 2))
        return {"numeric": [rng.choice([">", ">="]), low, rng.choice(["<", "<="]), high]}
    if choice == 8:
        blocks = ["10.0.0.0/8", "10.0.0.7", "2001:db8::/32", "0.0.0.0/0", "10.0.0.0/30", "::/0"]
        return {"cidr": rng.choice([*blocks, "11.0.0.0/8", "2001:db8::1/128"])}
    if choice == 9:
        return {"exists": rng.random() < 0.5}
    if choice == 10:
        return {"anything-but": rng.choice([text, number, rng.sample(STRINGS, 2)])}
    if choice == 11:
        kind = rng.choice(["prefix", "suffix", "equals-ignore-case", "wildcard"])
        # an empty prefix or suffix is refused there (it would exclude every string)
        operand = "a*" if kind == "wildcard" else text or "a"
        return {"anything-but": {kind: operand}}
    return rng.choice(SCALARS)


def _insert(obj: dict[str, Any], path: tuple[str, ...], leaf: Any) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    obj[path[-1]] = leaf


def random_pattern(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    pattern: dict[str, Any] = {}
    for path in rng.sample(PATHS, rng.randint(1, 3)):
        _insert(pattern, path, [_operator(rng) for _ in range(rng.randint(1, 3))])
    if depth < 2 and rng.random() < 0.3:
        branches = [random_pattern(rng, depth + 1) for _ in range(rng.randint(2, 3))]
        where = pattern if rng.random() < 0.5 else pattern.setdefault("data", {})
        if isinstance(where, dict):
            where["$or"] = [b.get("data", b) if where is not pattern else b for b in branches]
    return pattern


def _value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.7:
        return rng.choice(SCALARS)
    if roll < 0.85:
        return [rng.choice(SCALARS) for _ in range(rng.randint(0, 3))]
    return {"x": rng.choice(SCALARS)}


def _item(rng: random.Random) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for key in ("sku", "qty"):
        if rng.random() < 0.8:
            item[key] = _value(rng)
    return item


def random_event(rng: random.Random) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for path in PATHS:
        if rng.random() < 0.35:
            continue
        if path == ("data", "items", "qty"):
            continue  # made with sku: two fields of one array's elements (array consistency)
        if path == ("data", "items", "sku"):
            items = [_item(rng) for _ in range(3)]
            data = event.setdefault("data", {})
            if isinstance(data, dict):
                data["items"] = items if rng.random() < 0.7 else items[0]
            continue
        if path[0] == "data" and isinstance(event.get("data"), str):
            continue
        _insert(event, path, _value(rng))
    if rng.random() < 0.05:
        event["data"] = "not an object"
    return event


def _expected(entries: list[tuple[int, CompiledPattern]], event: dict[str, Any]) -> list[int]:
    seen: list[int] = []
    for key, pattern in entries:
        if key not in seen and pattern.matches(event):
            seen.append(key)
    order = list(dict.fromkeys(key for key, _ in entries))
    return sorted(seen, key=order.index)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("budget", [_index._MAX_BINDINGS, 0], ids=["walk", "reference"])
def test_index_agrees_with_single_pattern_matching(
    seed: int, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with no budget, every event with values in arrays is answered by the reference
    monkeypatch.setattr(_index, "_MAX_BINDINGS", budget)
    rng = random.Random(seed)
    entries = [(rng.randrange(250), compile_pattern(random_pattern(rng))) for _ in range(300)]
    index = PatternIndex(entries)
    hits = 0
    for _ in range(150):
        event = random_event(rng)
        expected = _expected(entries, event)
        assert index.match(event) == expected, event
        hits += len(expected)
    # The generator must exercise matches, not only misses.
    assert hits > 150


def test_key_matches_once_when_several_alternatives_match() -> None:
    pattern = compile_pattern(
        {"$or": [{"source": ["a"]}, {"type": ["t"]}, {"source": [{"prefix": "a"}]}]}
    )
    index = PatternIndex([("r", pattern), ("r", compile_pattern({"source": ["a"]}))])
    assert index.match({"source": "a", "type": "t"}) == ["r"]
    assert len(index) == 1


def test_keys_come_back_in_insertion_order() -> None:
    entries = [(name, compile_pattern({"source": ["s"]})) for name in ("z", "b", "m", "a")]
    entries.insert(2, ("other", compile_pattern({"source": ["x"]})))
    assert PatternIndex(entries).match({"source": "s"}) == ["z", "b", "m", "a"]


def test_shared_conditions_keep_their_own_keys() -> None:
    index = PatternIndex(
        [
            (1, compile_pattern({"source": ["s"], "data": {"n": [{"numeric": [">", 5]}]}})),
            (2, compile_pattern({"source": ["s"], "data": {"n": [{"numeric": [">", 5]}]}})),
            (3, compile_pattern({"source": ["s"]})),
            (4, compile_pattern({"source": ["s"], "data": {"n": [{"numeric": ["<", 5]}]}})),
        ]
    )
    assert index.match({"source": "s", "data": {"n": 6}}) == [1, 2, 3]
    assert index.match({"source": "s", "data": {"n": 4}}) == [3, 4]
    assert index.match({"source": "t", "data": {"n": 6}}) == []


def test_numeric_tables_with_many_bounds() -> None:
    entries = []
    for i in range(200):
        entries.append((f"gt{i}", compile_pattern({"n": [{"numeric": [">", i]}]})))
        entries.append((f"le{i}", compile_pattern({"n": [{"numeric": ["<=", i]}]})))
        entries.append((f"in{i}", compile_pattern({"n": [{"numeric": [">=", i, "<", i + 3]}]})))
        entries.append((f"eq{i}", compile_pattern({"n": [{"numeric": ["=", i]}]})))
    index = PatternIndex(entries)
    for x in (-1, 0, 0.5, 57, 57.0, 100.25, 199, 250):
        event = {"n": x}
        assert index.match(event) == [k for k, p in entries if p.matches(event)]


def test_empty_index_and_empty_pattern() -> None:
    assert PatternIndex([]).match({"source": "x"}) == []
    assert PatternIndex([("all", compile_pattern({}))]).match({}) == ["all"]


def test_nan_from_a_lenient_json_parser_matches_no_numeric_condition() -> None:
    entries = [
        ("ge", compile_pattern({"n": [{"numeric": [">=", 0]}]})),
        ("le", compile_pattern({"n": [{"numeric": ["<=", 0]}]})),
        ("in", compile_pattern({"n": [{"numeric": [">", -1, "<", 1]}]})),
        ("but", compile_pattern({"n": [{"anything-but": 1}]})),
    ]
    event = {"n": float("nan")}
    assert [k for k, p in entries if p.matches(event)] == ["but"]
    assert PatternIndex(entries).match(event) == ["but"]


def test_a_field_tested_at_several_nodes_is_read_the_same_everywhere() -> None:
    # ``type`` is tested at the root (rule "t"), under ``source`` (rules "st", "sa") and for
    # absence; the walk looks it up once and must reuse that value (scalar, array, object,
    # missing) at every node.
    entries = [
        ("t", compile_pattern({"type": ["x"]})),
        ("st", compile_pattern({"source": ["s"], "type": ["x", "y"]})),
        ("sa", compile_pattern({"source": ["s"], "type": [{"exists": False}]})),
        ("sp", compile_pattern({"source": ["s"], "type": [{"prefix": "y"}]})),
        ("n", compile_pattern({"data": {"type": [{"numeric": [">", 1]}]}})),
    ]
    index = PatternIndex(entries)
    for value in ("x", "y", ["y", "x"], [], {"type": "x"}, None, 2, [[["x"]]]):
        for event in ({"source": "s", "type": value}, {"source": "s", "data": {"type": value}}):
            assert index.match(event) == [k for k, p in entries if p.matches(event)], event


@pytest.mark.parametrize("last", ["e", "a"])
def test_many_values_in_arrays_of_their_own_do_not_multiply_the_work(last: str) -> None:
    # five fields under one array, four with 40 values each in arrays of their own: the
    # choices multiplied (40^4 for the reference, 50 s for the index on 600 bytes of data)
    fields = "abcde"
    pattern = compile_pattern({"data": {"items": {f: [{"exists": True}] for f in fields}}})
    first = {f: list(range(40)) for f in "abcd"}
    event = {"data": {"items": [first, {last: list(range(40))}]}}
    # "e" only in the other element: no element has all five; "a" there: none has "e"
    assert not pattern.matches(event)
    assert PatternIndex([("r", pattern)]).match(event) == []
    first["e"] = [1]
    assert pattern.matches(event)
    assert PatternIndex([("r", pattern)]).match(event) == ["r"]


def test_a_value_is_tried_only_against_the_wildcards_it_starts_or_ends_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3,000 wildcards tried in turn on each of 500 values took 1.6 s an event
    tried: list[str] = []
    test = Wildcard.test

    def counted(self: Wildcard, value: object) -> bool:
        tried.append(self.source)
        return test(self, value)

    entries = [(f"s{i}", compile_pattern({"f": [{"wildcard": f"w{i}-*.jpg"}]})) for i in range(500)]
    entries += [(f"e{i}", compile_pattern({"f": [{"wildcard": f"*.x{i}"}]})) for i in range(500)]
    entries.append(("any", compile_pattern({"f": [{"wildcard": "*-*"}]})))
    index = PatternIndex(entries)
    monkeypatch.setattr(Wildcard, "test", counted)
    event = {"f": ["w7-a.jpg", "w7-a.png", "b.x9", "w70.jpg", "nothing", "w1-.x2"]}
    assert index.match(event) == ["s7", "e2", "e9", "any"]
    # each value: the wildcards filed under a start or end it has, and "*-*"; never all 1,001
    assert len(tried) <= 3 * len(event["f"]), tried


def test_cidr_blocks_are_looked_up_by_prefix_length(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [(f"b{i}", compile_pattern({"ip": [{"cidr": f"10.{i}.0.0/16"}]})) for i in range(256)]
    entries.append(("host", compile_pattern({"ip": [{"cidr": "10.7.0.9"}]})))
    entries.append(("v6", compile_pattern({"ip": [{"cidr": "2001:db8::/32"}]})))
    index = PatternIndex(entries)
    monkeypatch.setattr(Cidr, "test", lambda self, value: pytest.fail("tested in turn"))
    assert index.match({"ip": "10.7.0.9"}) == ["b7", "host"]
    assert index.match({"ip": ["10.255.1.1", "2001:db8:1::5", "::ffff:10.7.0.9", "x"]}) == [
        "b255",
        "v6",
    ]
    assert index.match({"ip": "11.7.0.9"}) == []


def test_a_large_array_is_read_once_for_every_rule_looking_into_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Past the walk's budget, every rule of the set was tested by its own pattern, each
    # reading the event's array again: 300 rules on two fields of an array of 3,000
    # elements held the router's loop 14 s for one event. Now only the rules the walk could
    # still reach are tested, sharing what one read found.
    items = [{"sku": f"s{i % 7}", "qty": i % 5} for i in range(3000)]
    event = {"type": "order", "data": {"items": items}}

    def rule(i: int, kind: str) -> CompiledPattern:
        fields = {"sku": [f"s{i % 7}"], "qty": [{"numeric": [">", i % 5]}]}
        return compile_pattern({"type": [kind], "data": {"items": fields}})

    entries = [(f"r{i}", rule(i, "order")) for i in range(300)]
    entries += [(f"other{i}", rule(i, f"other{i}")) for i in range(300)]
    # an element of each sku has every qty but one above 4 (3,000 elements: 7 x 5 kinds)
    expected = [f"r{i}" for i in range(300) if i % 5 != 4]
    read: list[tuple[str, ...]] = []
    members_at = _pattern.members_at

    def counted(event: dict[str, Any], path: tuple[str, ...]) -> list[Any]:
        read.append(path)
        return members_at(event, path)

    monkeypatch.setattr(_pattern, "members_at", counted)
    assert PatternIndex(entries).match(event) == expected
    # the reference answered (the walk gave up), reading each path once, not once a rule
    assert sorted(read) == [("data", "items", "qty"), ("data", "items", "sku"), ("type",)]
