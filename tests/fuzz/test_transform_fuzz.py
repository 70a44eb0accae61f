"""Fuzzing transforms' JSONPath filters with random JSON items and literals: no event makes a
filter raise (one item it could not compare had emptied the whole selection), and each keeps
exactly the items whose value compares as JSON values do (a number with numbers, a string with
strings; a bool is no number), ``!=`` being the complement of ``==``."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.rules._transform import Transform, TransformSpec

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(alphabet="ab2", max_size=3),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.just("k"), SCALARS))
LITERALS = st.one_of(st.integers(-3, 3), st.sampled_from(["1.5", "'a'", "'2'", "true", "false"]))
OPS = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])


def _literal(text: str | int) -> Any:
    if isinstance(text, int):
        return text
    return {"1.5": 1.5, "true": True, "false": False}.get(text, str(text).strip("'"))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else type(value).__name__


def _expected(value: Any, op: str, literal: Any) -> bool:
    same = _kind(value) == _kind(literal)
    equal = same and value == literal
    if op == "==":
        return equal
    if op == "!=":
        return not equal
    if not same or _kind(value) not in ("number", "str"):
        return False
    return {"<": value < literal, "<=": value <= literal, ">": value > literal}.get(
        op, value >= literal
    )


@settings(max_examples=300)
@given(values=st.lists(VALUES, max_size=6), op=OPS, literal=LITERALS)
def test_filters_keep_the_items_that_compare_as_json(
    values: list[Any], op: str, literal: str | int
) -> None:
    path = f"$.data.items[?(@.v {op} {literal})].n"
    transform = Transform.compile(
        TransformSpec.model_validate({"input_paths": {"kept": path}, "template": {"k": "<kept>"}})
    )
    items = [{"n": i, "v": value} for i, value in enumerate(values)]
    kept = transform.apply({"data": {"items": items}})["k"]
    assert kept == [i for i, value in enumerate(values) if _expected(value, op, _literal(literal))]
