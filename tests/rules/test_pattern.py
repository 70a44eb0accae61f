"""The pattern language, case by case: every operator and the EventBridge edge cases, read from
the table files in ``data/patterns`` (one JSON list per topic), plus every invalid pattern."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus._errors import PatternError, RuleError
from eventbus.rules._index import PatternIndex
from eventbus.rules._pattern import MAX_ALTERNATIVES, compile_pattern, matches

DATA = Path(__file__).parent / "data" / "patterns"


def _cases(kind: str) -> list[Any]:
    params = []
    for file in sorted(DATA.glob("*.json")):
        if (file.stem == "invalid") != (kind == "invalid"):
            continue
        for case in orjson.loads(file.read_bytes()):
            params.append(pytest.param(case, id=f"{file.stem}: {case['name']}"))
    return params


@pytest.mark.parametrize("case", _cases("valid"))
def test_table_case(case: dict[str, Any]) -> None:
    assert case["match"] or case["no_match"]
    for event in case["match"]:
        assert matches(case["pattern"], event), event
    for event in case["no_match"]:
        assert not matches(case["pattern"], event), event


@pytest.mark.parametrize("case", _cases("valid"))
def test_table_case_through_the_index(case: dict[str, Any]) -> None:
    index = PatternIndex([("rule", compile_pattern(case["pattern"]))])
    for event in case["match"]:
        assert index.match(event) == ["rule"], event
    for event in case["no_match"]:
        assert index.match(event) == [], event


@pytest.mark.parametrize("case", _cases("invalid"))
def test_invalid_pattern(case: dict[str, Any]) -> None:
    with pytest.raises(PatternError) as info:
        compile_pattern(case["pattern"])
    assert info.value.path == case["path"]
    assert case["message"] in str(info.value)
    if case["path"]:
        assert str(info.value).startswith(f"{case['path']}: ")


def test_invalid_pattern_through_matches_is_a_rule_error() -> None:
    with pytest.raises(RuleError, match=r"^source: .*array"):
        matches({"source": "x"}, {"source": "x"})


def test_non_string_key_is_refused() -> None:
    with pytest.raises(PatternError, match="field names must be strings"):
        compile_pattern({1: ["x"]})


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(PatternError, match="finite"):
        compile_pattern({"x": [float("nan")]})
    with pytest.raises(PatternError, match="finite"):
        compile_pattern({"x": [{"numeric": ["<", float("inf")]}]})


def test_or_blow_up_is_bounded() -> None:
    groups = {f"f{i}": {"$or": [{"a": ["x"]}, {"b": ["y"]}]} for i in range(11)}
    assert MAX_ALTERNATIVES < 2**11
    with pytest.raises(PatternError, match="more than 1024 alternatives"):
        compile_pattern(groups)
    ten = {f"f{i}": {"$or": [{"a": ["x"]}, {"b": ["y"]}]} for i in range(10)}
    assert len(compile_pattern(ten).alternatives) == 1024


def test_deep_nesting_is_refused() -> None:
    pattern: dict[str, Any] = {"x": ["v"]}
    for _ in range(40):
        pattern = {"d": pattern}
    with pytest.raises(PatternError, match="nested deeper"):
        compile_pattern(pattern)


def test_deeply_nested_or_is_refused() -> None:
    pattern: dict[str, Any] = {"x": ["v"]}
    for _ in range(2000):
        pattern = {"$or": [pattern, {"y": ["w"]}]}
    with pytest.raises(PatternError, match="nested deeper"):
        compile_pattern(pattern)


def test_compiled_pattern_is_immutable_and_reusable() -> None:
    compiled = compile_pattern({"source": ["a"], "$or": [{"x": [1]}, {"y": [2]}]})
    with pytest.raises(AttributeError):
        compiled.leaves = ()  # type: ignore[misc]
    assert compiled.matches({"source": "a", "y": 2})
    assert not compiled.matches({"source": "a", "y": 3})
    assert len(compiled.alternatives) == 2


def test_duplicate_alternatives_collapse() -> None:
    compiled = compile_pattern({"x": ["a", "a", {"prefix": "b"}, {"prefix": "b"}]})
    assert len(compiled.leaves[0].matchers) == 2


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"data": None},
        {"data": [1, [2, [3]], {"x": {"y": []}}]},
        {"source": {"nested": ["deep"]}},
        {"data": {"x": [[[[[]]]]]}},
        {"data": "a" * 10_000},
    ],
)
def test_odd_events_never_raise(event: dict[str, Any]) -> None:
    pattern = {
        "source": [{"anything-but": "q"}, {"exists": False}],
        "data": {"x": [{"numeric": [">", 1]}, {"cidr": "10.0.0.0/8"}, {"wildcard": "a*"}]},
    }
    assert isinstance(matches(pattern, event), bool)
    index = PatternIndex([("r", compile_pattern(pattern))])
    assert index.match(event) == (["r"] if matches(pattern, event) else [])


def test_deeply_nested_event_does_not_hit_the_recursion_limit() -> None:
    event: dict[str, Any] = {"leaf": "v"}
    value: Any = event
    for _ in range(5000):
        value = [value]
    deep = {"data": value}
    assert matches({"data": {"leaf": ["v"]}}, deep)
    assert PatternIndex([(1, compile_pattern({"data": {"leaf": ["v"]}}))]).match(deep) == [1]


def _doc_examples() -> list[Any]:
    doc = (Path(__file__).parents[2] / "docs" / "patterns.md").read_text()
    examples = []
    for block in doc.split("```json\n")[1:]:
        text = block.split("```", 1)[0]
        try:
            examples.append(orjson.loads(text))
        except orjson.JSONDecodeError:
            examples.extend(orjson.loads(line) for line in text.splitlines() if line.strip())
    return examples


def test_every_pattern_in_the_docs_compiles() -> None:
    examples = _doc_examples()
    event = examples[0]
    assert event["specversion"] == "1.0"
    for pattern in examples[1:]:
        compile_pattern(pattern)
    # The first pattern on the page matches the example event shown above it.
    assert matches(examples[1], event)


def _doc_errors() -> list[tuple[str, str]]:
    doc = (Path(__file__).parents[2] / "docs" / "patterns.md").read_text()
    section = doc.split("## Invalid patterns")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [(row.split(" | ")[0][2:], row.split(" | ")[1].rstrip(" |")) for row in rows]


@pytest.mark.parametrize(("pattern", "message"), _doc_errors())
def test_every_error_in_the_docs_is_raised(pattern: str, message: str) -> None:
    for text in pattern.split("` (")[0].split("`, `"):
        with pytest.raises(PatternError) as info:
            compile_pattern(orjson.loads(text.strip("`")))
        assert message in str(info.value)


_WILDCARD_TEXT = st.text(alphabet="ab*", max_size=8).filter(lambda t: "**" not in t)


@given(pattern=_WILDCARD_TEXT, value=st.text(alphabet="ab*", max_size=10))
def test_wildcards_match_as_a_regular_expression_would(pattern: str, value: str) -> None:
    # the reference: each star as ".*" (what eventbus compiled it to, and backtracked on)
    regex = ".*".join(re.escape(piece) for piece in pattern.split("*"))
    want = re.fullmatch(regex, value, re.DOTALL) is not None
    assert matches({"subject": [{"wildcard": pattern}]}, {"subject": value}) is want


def test_many_stars_on_a_long_value_are_answered() -> None:
    # a regular expression backtracked for 34 s on each of these: routing stopped meanwhile
    slashes = {"subject": "/" * 1000}
    assert not matches({"subject": [{"wildcard": "*/*/*/*.jpg"}]}, slashes)
    assert not matches({"subject": [{"wildcard": "*a*a*a*b"}]}, {"subject": "a" * 1000})
    assert matches({"subject": [{"wildcard": "*a*a*a*b"}]}, {"subject": "a" * 1000 + "b"})


def _wide_or(depth: int, values: int) -> dict[str, Any]:
    """``depth`` nested two-way "$or"s (2**depth alternatives) beside one field of ``values``
    exact values and a prefix: every alternative holds that field's condition."""
    pattern: dict[str, Any] = {}
    for level in range(depth):
        branches = [{"data": {"y": ["p"]}}, {"data": {"y": ["q"]}}]
        pattern = {"$or": branches, **({"n": pattern} if level else {})}
    pattern["data"] = {"x": [f"v{i}" for i in range(values)] + [{"prefix": "zz"}]}
    return pattern


def test_a_field_shared_by_every_alternative_is_tested_once_per_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1,024 alternatives of a 600-value field against 101 values: 62 million tests, seconds on
    # the router's loop for one event (a console filter); now once per value, exact values by
    # one set lookup
    from eventbus.rules import _pattern_ops

    calls = []
    test = _pattern_ops.Prefix.test
    monkeypatch.setattr(
        _pattern_ops.Prefix, "test", lambda self, v: calls.append(v) or test(self, v)
    )
    pattern = compile_pattern(_wide_or(10, 600))
    assert len(pattern.alternatives) == 1024
    event = {"data": {"x": [f"w{i}" for i in range(100)] + ["zz"], "y": "r"}}
    assert not pattern.matches(event)
    assert len(calls) == 101
    nested: dict[str, Any] = {"data": {"y": "q"}}
    for _ in range(9):
        nested = {"data": {"y": "p"}, "n": nested}
    assert pattern.matches({**nested, "data": {"x": ["w1", "zz"], "y": "q"}})
    assert pattern.matches({**nested, "data": {"x": ["v599"], "y": "p"}})
    assert not pattern.matches({**nested, "data": {"x": ["v600"], "y": "p"}})
    calls.clear()
    assert PatternIndex([("k", pattern)]).match(event) == []
    assert len(calls) <= 101  # the index, as the console's live filter uses it


def test_two_fields_in_different_elements_of_one_array_are_not_tried_pair_by_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each value of the first field was tried against every value of the second: n^2/4 pairs
    # for n elements, 18 s of the router for an event of 210 KB that could not match.
    from eventbus.rules import _pattern

    calls = 0
    consistent = _pattern.consistent

    def counted(constraint: dict[int, int], membership: Any) -> Any:
        nonlocal calls
        calls += 1
        return consistent(constraint, membership)

    monkeypatch.setattr(_pattern, "consistent", counted)
    pattern = compile_pattern({"data": {"items": {"p": ["v"], "q": ["v"]}}})
    items: list[dict[str, Any]] = [{"p": "v"} if i % 2 else {"q": "v"} for i in range(4000)]
    assert not pattern.matches({"data": {"items": items}})
    assert calls <= 2 * len(items), calls  # old: 4 million
    assert pattern.matches({"data": {"items": [*items, {"p": "v", "q": "v"}]}})
    # ... and under arrays nested in an array's elements (each element's own array): the
    # join looked at every array crossed, listing for each the memberships outside it (one
    # list of about every membership for each of the 1,000 inner arrays: seconds, 98 MB)
    calls = 0
    joins: list[Any] = []
    places = _pattern._Places.__init__

    def kept(self: Any, fits: Any) -> None:
        places(self, fits)
        joins.append(self)

    monkeypatch.setattr(_pattern._Places, "__init__", kept)
    tagged = compile_pattern({"data": {"items": {"tags": {"k": ["a"], "v": ["b"]}}}})
    rows = [{"tags": [{"k": "a"}, {"v": "b"}, {"k": "a"}, {"v": "b"}]} for _ in range(1000)]
    assert not tagged.matches({"data": {"items": rows}})
    assert calls <= 2 * 4 * len(rows), calls
    assert joins and max(len(join._outside) for join in joins) <= 2
    # fields under two arrays, one of them nested in the other's elements
    nested = {"data": {"a": [{"b": [{"p": "v"}, {"q": "v"}]}, {"b": [{"p": "v", "q": "v"}]}]}}
    deep = compile_pattern({"data": {"a": {"b": {"p": ["v"], "q": ["v"]}}}})
    assert deep.matches(nested)
    assert not deep.matches({"data": {"a": [{"b": [{"p": "v"}, {"q": "v"}]}]}})
