"""Transforms: JSONPath variables, JSON and string templates, constants (no servers)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from pydantic import ValidationError

from eventbus.rules import _transform as transform_module
from eventbus.rules import compile_rules
from eventbus.rules._transform import MAX_SELECTED, Transform, TransformSpec, TransformTooLarge

TABLE = yaml.safe_load((Path(__file__).parent / "data" / "transform_cases.yaml").read_text())
EVENT: dict[str, Any] = TABLE["event"]


def build(spec: dict[str, Any]) -> Transform:
    return Transform.compile(TransformSpec.model_validate(spec))


@pytest.mark.parametrize("case", TABLE["cases"], ids=[c["id"] for c in TABLE["cases"]])
def test_apply(case: dict[str, Any]) -> None:
    event = copy.deepcopy(EVENT)
    transform = build(case["spec"])
    payload = transform.apply(event)
    if "payload_is_event_under" in case:
        assert payload == {case["payload_is_event_under"]: EVENT}
    else:
        assert payload == case["payload"]
    assert transform.keep_cloudevent == case.get("is_cloudevent", False)
    assert event == EVENT, "the event itself is never modified"
    orjson.dumps(payload)  # always JSON-serializable


def test_results_are_fresh_per_event() -> None:
    transform = build({"input_paths": {"k": "$.data.key"}, "template": {"k": "<k>", "l": [1]}})
    first, second = transform.apply(EVENT), transform.apply(EVENT)
    assert first == second
    assert first is not second and first["l"] is not second["l"]


def test_definite_paths_give_one_value_others_a_list() -> None:
    transform = build(
        {
            "input_paths": {"one": "$.data.parts[0]", "many": "$.data.parts[0,1]"},
            "template": {"one": "<one>", "many": "<many>"},
        }
    )
    assert [(v.name, v.many) for v in transform.variables] == [("one", False), ("many", True)]
    assert transform.apply(EVENT)["many"] == EVENT["data"]["parts"]


@pytest.mark.parametrize("event", [{}, {"data": None}, {"data": "text"}, {"data": [1]}])
def test_apply_never_raises_on_odd_events(event: dict[str, Any]) -> None:
    transform = build(
        {
            "input_paths": {"key": "$.data.key", "odd": "$.data[?(@.n > 1)]"},
            "template": "<key>/<odd>",
        }
    )
    assert transform.apply(event) == "null/[]"


@pytest.mark.parametrize("case", TABLE["errors"], ids=[c["id"] for c in TABLE["errors"]])
def test_invalid_specs(case: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        TransformSpec.model_validate(case["spec"])
    errors = caught.value.errors()
    assert any(list(e["loc"]) == case["loc"] and case["message"] in e["msg"] for e in errors), (
        errors
    )


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("$.subject.`sub(/^(a+)+$/, x)`", "sub() (a regular expression)"),
        ('$.data.items[?(@.sku =~ "^(a+)+$")]', "=~ (a regular expression)"),
        ("$.data.s * $.data.n", "arithmetic"),
        ("$.data.items[?(@.qty > 1)].`sub(/a/, b)`", "sub() (a regular expression)"),
        # each multiplies the selection: 683 MB of a 1.4 KB event, 7 s in the router's loop
        ("$..*..*", "more than one recursive descent (..)"),
        ("$.data..items..sku", "more than one recursive descent (..)"),
        ("$..k[?(@..x)]", "more than one recursive descent (..)"),  # 5 s a 214 KB event
        ("$.data.$", "'$' past the start of the path"),  # the whole event again
    ],
)
def test_jsonpath_extensions_beyond_filters_are_refused(path: str, what: str) -> None:
    # Python's backtracking re on event text (seconds on 25 characters), and a string repeated
    # by an event's number (400 MB in 2 s), each in the router's loop
    with pytest.raises(ValidationError, match=re.escape(f"JSONPath '{path}': {what}")):
        TransformSpec.model_validate({"input_paths": {"a": path}, "template": "<a>"})


@pytest.mark.parametrize("field", ["template", "constant"])
def test_a_template_or_constant_deeper_than_64_levels_is_refused(field: str) -> None:
    # filled with data up to 64 levels deep, the payload passed what JSON serializes (254)
    deep: Any = "<d>" if field == "template" else 1
    for _ in range(64):
        deep = [deep]
    paths = {"input_paths": {"d": "$.data"}} if field == "template" else {}
    assert TransformSpec.model_validate({**paths, field: deep})
    with pytest.raises(ValidationError, match="more than 64 levels deep"):
        TransformSpec.model_validate({**paths, field: [deep]})


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


def test_a_transform_over_its_bound_skips_its_target_and_is_counted() -> None:
    # $..* over 63 levels selected every subtree: 16 MB to deliver of a 256 KiB event
    rules = compile_rules(
        [
            {
                "name": "r",
                "transform": {"input_paths": {"all": "$..*"}, "template": {"x": "<all>"}},
                "targets": [
                    "t",
                    {
                        "name": "id",
                        "transform": {"input_paths": {"id": "$.id"}, "template": "<id>"},
                    },
                ],
            }
        ]
    )
    deep = {"specversion": "1.0", "id": "1", "source": "s", "type": "t"}
    routes = rules.route({**deep, "data": _nested(63, "x" * 100_000)})
    assert [r.target for r in routes] == ["id"] and rules.transform_errors["r"] == 1
    (small, _) = rules.route({**deep, "data": _nested(63, "x")})
    assert len(small.payload["x"]) == 4 + 64  # within bounds, as before: attributes, subtrees
    wide = {**deep, "data": {f"k{i}": i for i in range(MAX_SELECTED)}}
    assert [r.target for r in rules.route(wide)] == ["id"]


def test_a_template_placing_a_value_many_times_is_held_to_the_bound() -> None:
    # Only several-valued paths were measured: 400 uses of one value made 80 MB of an event
    # of 200 KB in 0.05 s.
    many = {"all": "$"}
    template = "".join("<all>" for _ in range(400))
    transform = build({"input_paths": many, "template": template})
    event = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": "x" * 200_000}
    with pytest.raises(TransformTooLarge, match="more than 4194304 bytes"):
        transform.apply(event)
    assert len(transform.apply({**event, "data": "x"})) > 400  # small ones as before
    # a few uses are not measured (within a few times the event itself)
    few = build({"input_paths": many, "template": {"a": "<all>", "b": ["<all>", "<all>"]}})
    assert not few.many


def test_a_constant_nested_thousands_of_levels_is_refused_not_a_recursion_error() -> None:
    with pytest.raises(ValidationError, match="more than 64 levels"):
        TransformSpec.model_validate({"constant": _nested(3000, 1)})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 2**64, -(2**63) - 1])
def test_a_number_json_cannot_write_is_refused(value: float) -> None:
    # YAML's 1e400 (or .inf) loaded and went out as null; an integer beyond 64 bits made the
    # router fail on every event the rule matched (retried for ever, no target got it)
    with pytest.raises(ValidationError, match="which JSON cannot write"):
        TransformSpec.model_validate({"constant": {"limit": [value]}})


@pytest.mark.parametrize(
    ("path", "template"),
    [("$.data.n", "n=<v>"), ("$.data.n", {"v": "at <v>"}), ("$.data.m[*]", {"v": "<v>"})],
)
def test_an_integer_beyond_64_bits_in_an_event_skips_the_target_not_the_routing(
    path: str, template: Any
) -> None:
    # ingestion refuses such integers; an event handed to route() directly made it raise
    # orjson's TypeError (route promises never to raise for a JSON-shaped event)
    rules = compile_rules(
        [
            {
                "name": "r",
                "targets": [
                    {"name": "t", "transform": {"input_paths": {"v": path}, "template": template}},
                    "plain",
                ],
            }
        ]
    )
    event = {"id": "1", "source": "s", "type": "t", "data": {"n": 2**64, "m": [2**64]}}
    assert [r.target for r in rules.route(event)] == ["plain"]
    assert rules.transform_errors["r"] == 1


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # jsonpath-ng turned the event's value into an int when the literal was one
        ("$.data.items[?(@.price == 2)].sku", ["b"]),
        ("$.data.items[?(@.price > 2)].sku", ["a"]),
        ("$.data.items[?(@.price == 1)].sku", []),
        ("$.data.items[?(@.price != 2)].sku", ["a", "c", "d", "e"]),
        ("$.data.items[?(@.price >= 2)].sku", ["a", "b"]),
        ("$.data.items[?(@.price == '2')].sku", ["c"]),
        # ... and one value it could not compare (null) emptied the whole selection
        ("$.data.items[?(@.price < 3)].sku", ["a", "b"]),
    ],
)
def test_filters_compare_json_values(path: str, expected: list[str]) -> None:
    transform = Transform.compile(
        TransformSpec.model_validate({"input_paths": {"v": path}, "template": "<v>"})
    )
    items = [
        {"sku": "a", "price": 2.9},
        {"sku": "b", "price": 2},
        {"sku": "c", "price": "2"},
        {"sku": "d", "price": True},
        {"sku": "e", "price": None},
    ]
    assert transform.apply({"data": {"items": items}}) == expected


def test_only_the_variables_the_template_places_are_searched() -> None:
    # each unused one cost its search all the same: 40 unused filter paths over a 250 KB
    # event held the router 8 s
    spec = {
        "input_paths": {"used": "$.data.a", "unused": "$.data.items[?(@.n > 1)]"},
        "template": {"a": "<used>"},
    }
    transform = build(spec)
    assert [v.name for v in transform.variables] == ["used"]
    assert transform.apply({"data": {"a": 1, "items": [{"n": 2}]}}) == {"a": 1}


def test_input_paths_past_the_time_budget_fail_the_transform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = {
        "input_paths": {"a": "$.data.a", "b": "$.data.b"},
        "template": {"a": "<a>", "b": "<b>"},
    }
    transform = build(spec)
    assert transform.apply({"data": {"a": 1, "b": 2}}) == {"a": 1, "b": 2}
    monkeypatch.setattr(transform_module, "MAX_TRANSFORM_SECONDS", -1.0)  # over at once
    with pytest.raises(TransformTooLarge, match="input paths took more than"):
        transform.apply({"data": {"a": 1, "b": 2}})


def test_a_filters_null_is_jsons_null_not_the_text() -> None:
    # jsonpath-ng reads it as the string "null": [?(@.qty == null)] selected qty: "null"
    event = {"data": {"items": [{"sku": "A", "qty": None}, {"sku": "S", "qty": "null"}]}}

    def selected(path: str) -> Any:
        return build({"input_paths": {"x": path}, "template": {"v": "<x>"}}).apply(event)["v"]

    assert selected("$.data.items[?(@.qty == null)].sku") == ["A"]
    assert selected("$.data.items[?(@.qty != null)].sku") == ["S"]
    assert selected("$.data.items[?(@.qty == 'null')].sku") == ["S"]
    with pytest.raises(ValidationError, match="null and the string 'null' in one path"):
        selected("$.data.items[?(@.qty == null & @.sku == 'null')].sku")
    # a field named null is no literal (such paths were refused at load)
    named = {"data": {"null": [{"kind": "null"}], "items": [{"null": "null", "sku": "A"}]}}
    for path, values in (
        ("$.data.null[?(@.kind == 'null')].kind", ["null"]),
        ("$.data.items[?(@.null == 'null')].sku", ["A"]),
    ):
        spec = {"input_paths": {"x": path}, "template": {"v": "<x>"}}
        assert build(spec).apply(named)["v"] == values
