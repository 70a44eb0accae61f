"""The CEL fast path against cel-python: the same verdict and reason on every condition and
event, generated or from the case table (no servers)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventbus._errors import RuleError
from eventbus.rules._cel import Condition, Verdict, _env, activation, compile_condition
from eventbus.rules._cel_fast import Unsure

TABLE = yaml.safe_load((Path(__file__).parent / "data" / "cel_cases.yaml").read_text())
RUNS = [c for c in TABLE["cases"] if "outcome" in c]


def _both(condition: Condition, event: dict[str, Any]) -> tuple[Any, Any]:
    """The verdicts and reasons with and without the fast path; cel-python's reason for an
    error of two errors (its text doubles with each ``||``) is the first error's on the fast
    path, so it is compared as that."""
    slow = dataclasses.replace(condition, fast=None)
    fast_answer, slow_answer = (
        condition.evaluate(activation(event)),
        slow.evaluate(activation(event)),
    )
    if slow_answer[1].startswith(_ERROR_OF_ERRORS):
        slow_answer = (slow_answer[0], fast_answer[1])
    return fast_answer, slow_answer


_ERROR_OF_ERRORS = "no such overload: <class 'celpy.evaluation.CELEvalError'>"


@pytest.mark.parametrize("case", RUNS, ids=[c["expr"] for c in RUNS])
def test_case_table_gives_the_same_verdicts(case: dict[str, str]) -> None:
    fast, slow = _both(compile_condition(case["expr"]), TABLE["event"])
    assert fast == slow


_SENSOR = {"data": {"temp": 35.5, "unit": "C"}}
COMMON = [
    ('event.data.temp > 30.0 && event.data.unit == "C"', _SENSOR, True),
    ("event.data.total > 10 && event.data.items.size() >= 1", {"data": {"total": 8}}, False),
    ('has(event.data.x) || event["type"] in ["a", "b"]', {"type": "b", "data": {}}, True),
    ('event.subject.startsWith("up") ? size(event.id) == 2 : false', {"subject": "u"}, False),
    ('!("eu" in event.data.tags) && event.data.n == null', {"data": {"tags": [], "n": None}}, True),
    ("event.data.m[1] != 0x10 && 'k' in event.data", {"data": {"m": [0, 15], "k": 1}}, True),
    ("event.data.price * event.data.qty > 100.0", {"data": {"price": 9.5, "qty": 11.0}}, True),
    # an overflow is an error value, absorbed by the side of || that decides
    ("event.data.big * 4 == 0 || event.data.big > 0", {"data": {"big": 2**62}}, True),
    ("event.data.a - event.data.b == -event.data.c", {"data": {"a": 1, "b": 4, "c": 3}}, True),
]


@pytest.mark.parametrize(("source", "event", "value"), COMMON)
def test_common_conditions_are_answered_without_cel_python(
    source: str, event: dict[str, Any], value: bool
) -> None:
    condition = compile_condition(source)
    assert condition.fast is not None
    assert condition.fast(event) is value
    verdict = Verdict.MATCH if value else Verdict.NO_MATCH
    assert condition.evaluate(activation(event)) == (verdict, "")


@pytest.mark.parametrize(
    ("source", "event"),
    [
        ("event.data.total > 100.5", {"data": {"total": 250}}),  # int against double: an error
        ("event.data.coupon == 'X'", {"data": {}}),  # no such field
        ("event.data.big > 1", {"data": {"big": 2**70}}),  # a double to cel-python
        ("size(event.data.note) == 0", {"data": {"note": None}}),  # cel-python's size(null) is 0
        ("event.data.n < 'a' || true", {"data": {"n": 1}}),  # an error on the left of ||
        ("1 in event.data.mixed", {"data": {"mixed": ["1", 1]}}),
        ("event.data.tags[2] == 'x'", {"data": {"tags": ["a"]}}),
        ("event.data.flag", {"data": {"flag": "yes"}}),  # not a bool
        # cel-python fails outright on these, whatever the other side of && or || says
        ("false && event.data.tags.x == 1", {"data": {"tags": []}}),
        ("event.data.s.startsWith('a') || true", {"data": {"s": 1}}),
        ("true ? true : event.type.x", {"type": "t"}),
        # `true == 1` is true on cel-python; `list[-1]` reads from the end
        ("event.data.flag == 1", {"data": {"flag": True}}),
        ("event.data.tags[-1] == 'a'", {"data": {"tags": ["a"]}}),
        # cel-python adds a bool to an int and multiplies a double by an int; int64 overflows
        ("event.data.flag + 1 == 2", {"data": {"flag": True}}),
        ("event.data.price * 2 == 19.0", {"data": {"price": 9.5}}),
        ("event.data.big * 4 == 0", {"data": {"big": 2**62}}),
        ("-event.data.n > 0", {"data": {"n": -(2**63)}}),
        # two strings concatenate to a plain str on cel-python, which has no .contains()
        ('(event.type + "x").contains("x")', {"type": "a"}),
        ('false && (event.type + "x").contains("x")', {"type": "a"}),
        ('has(event.data.s) && ("b" + "a").contains(event.type)', {"type": "a", "data": {"s": 1}}),
        # an error value as the target of a field or a string method: the compiled runner
        # calls a method of the error object and fails outright
        ("(event.a || false).b || true", {}),
        ('(event.a || false).startsWith("x") || true', {}),
        ('(event.f ? event.a : "s").startsWith("x") || event.u', {"f": True, "u": True}),
        ('false && (true && event.a).contains("x")', {}),
        # ... and on a receiver without the method, even when the argument is an error value
        ("false && !true.endsWith(event.data.b)", {"data": {}}),
    ],
)
def test_the_unusual_is_left_to_cel_python(source: str, event: dict[str, Any]) -> None:
    condition = compile_condition(source)
    assert condition.fast is not None
    with pytest.raises(Unsure):
        if condition.fast(event) not in (True, False):
            raise Unsure
    fast, slow = _both(condition, event)
    assert fast == slow


@pytest.mark.parametrize(
    "source",
    [
        "event.data.total / 2 > 1",  # division and remainder
        "event.data.total % 2 == 0",
        "event.data.items.exists(i, i.qty > 1)",  # a macro
        'event.data.currency.matches("^E")',  # RE2, not Python's re
        "event.data.n == 1u",  # uint
        "event.data.b == b'x'",  # bytes
        "type(event.data.total) == int",
        "event.data.m == {'a': 1}",
        "event.data.n in [1, event.data.m]",
        "event.data.n in [[1]]",  # a nested list
        "has(event.a, event.b)",
        # size() of a && || ?: : cel-python's own words for their error values (found by the
        # generated conditions below)
        "((event.data) && (event.data)).size() == 1",
        "size(event.a || event.b) == 1",
        "(event.a ? event.b : event.c).size() == 1",
    ],
)
def test_anything_else_runs_on_cel_python_alone(source: str) -> None:
    condition = compile_condition(source)
    assert condition.fast is None
    for event in ({"a": 1, "b": True, "data": {"n": 1}}, {"b": False}):
        fast, slow = _both(condition, event)
        assert fast == slow


# -- generated conditions and events

_KEYS = ("a", "b", "tags", "n")
_scalars = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 10**20]),
    st.sampled_from([0.0, -0.0, 1.5, 3.0, -2.25, 1e300]),
    st.text(alphabet="ab\u00e9\n", max_size=3),
    st.booleans(),
    st.none(),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3)
    ),
    max_leaves=6,
)
_events = st.fixed_dictionaries(
    {"type": st.sampled_from(["a", "b", "ab"])},
    optional={"data": st.one_of(st.dictionaries(st.sampled_from(_KEYS), _json, max_size=4), _json)},
)

_literals = st.sampled_from(
    [
        "0", "1", "-1", "3", "0x3", "9223372036854775807", "1.5", "0.0", "-2.25", "3.0",
        '"a"', "'b'", '"ab"', '""', 'r"a\\n"', '"a\\n"', '"\\u00e9"', "'''ab'''",
        "true", "false", "null", "1u",
    ]
)  # fmt: skip
_fields = st.sampled_from(
    [
        "event.type", "event.data", "event.data.a", "event.data.b", "event.data.tags",
        "event.data.n", "event.data.a.b", 'event.data["a"]', "event.data.tags[0]",
        "event.data.tags[1]", "event.data.n[0]", 'event["data"]', "event.missing",
        "event.data.tags.x", "event.data.tags[-1]", "event.type.x", "event.data.a[event.data.b]",
    ]
)  # fmt: skip


def _values(depth: int) -> st.SearchStrategy[str]:
    plain = st.one_of(_literals, _fields)
    if depth == 0:
        return plain
    inner = _values(depth - 1)
    return st.one_of(
        plain,
        inner.map(lambda v: f"size({v})"),
        inner.map(lambda v: f"{v}.size()"),
        st.lists(st.one_of(_literals, _literals.map(lambda v: f"[{v}]")), max_size=3).map(
            lambda items: "[" + ", ".join(items) + "]"
        ),
        st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(" ".join),
        inner.map(lambda v: f"-({v})"),
    )


def _conditions(depth: int) -> st.SearchStrategy[str]:
    values = _values(1)
    relations = st.tuples(
        values, st.sampled_from(["<", "<=", ">", ">=", "==", "!=", "in"]), values
    ).map(" ".join)
    tests = st.tuples(values, st.sampled_from(["startsWith", "endsWith", "contains"]), values).map(
        lambda t: f"{t[0]}.{t[1]}({t[2]})"
    )
    has = st.sampled_from(["a", "b", "tags", "n", "a.b"]).map(lambda f: f"has(event.data.{f})")
    leaf = st.one_of(relations, tests, has, values)
    if depth == 0:
        return leaf
    inner = _conditions(depth - 1)
    return st.one_of(
        leaf,
        inner.map(lambda c: f"!({c})"),
        st.tuples(inner, st.sampled_from(["&&", "||"]), inner).map(
            lambda t: f"({t[0]}) {t[1]} ({t[2]})"
        ),
        st.tuples(inner, inner, inner).map(lambda t: f"({t[0]}) ? ({t[1]}) : ({t[2]})"),
        # the result of an operator as the target of a field, a method or an index
        st.tuples(inner, st.sampled_from([".x", '.startsWith("a")', ".size()", "[0]"])).map(
            lambda t: f"({t[0]}){t[1]} == 1"
        ),
        # a side that decides, so that what the other side does on cel-python shows
        st.tuples(st.sampled_from(["false &&", "true ||"]), inner).map(
            lambda t: f"{t[0]} ({t[1]})"
        ),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=_conditions(2), events=st.lists(_events, min_size=1, max_size=4))
def test_generated_conditions_agree_with_cel_python(source: str, events: list[Any]) -> None:
    try:
        condition = compile_condition(source)
    except RuleError:
        return  # refused at load, by cel-python's checks, with or without the fast path
    for event in events:
        fast, slow = _both(condition, event)
        assert fast == slow, (source, event)


LITERALS = [
    "0", "-7", "0x1F", "-0x1f", "9223372036854775807", "-9223372036854775808",
    "1.5", "1e3", "-2.5E-3", "0.0", "1.",
    '"a"', "'b'", '"\\x41\\101\\u00e9\\U0001F600"', "'\\n\\t\\\\'", 'r"\\d+"', "'''a\nb'''",
    '"""q"r"""', "R'x\\n'", '""',
]  # fmt: skip


@pytest.mark.parametrize("literal", LITERALS)
def test_literals_read_as_cel_python_reads_them(literal: str) -> None:
    value = _env().program(_env().compile(literal)).evaluate({})
    plain = {bool: bool, int: int, float: float, str: str}[
        next(t for t in (bool, int, float, str) if isinstance(value, t))
    ](value)
    for source in (f"event.v == {literal}", f"has(event.v) && event.v == {literal}"):
        condition = compile_condition(source)
        assert condition.fast is not None
        assert condition.fast({"v": plain}) is True, source
        fast, slow = _both(condition, {"v": plain})
        assert fast == slow == (Verdict.MATCH, ""), source


def test_a_long_chain_of_errors_is_answered_by_the_fast_path() -> None:
    # cel-python's error of two errors holds both texts: 26 ||s on a missing field took it
    # 29 s and 3.6 GiB (40 were killed for memory), one event stalling routing
    source = " || ".join(f'event.data.country == "C{i}"' for i in range(40))
    condition = compile_condition(source)
    assert condition.fast is not None
    verdict = condition.evaluate(activation({"data": {"city": "Paris"}}))
    assert verdict == (Verdict.ERROR, "no such member in mapping: 'country': country")
    assert condition.evaluate(activation({"data": {"country": "C39"}})) == (Verdict.MATCH, "")
