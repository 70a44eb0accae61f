"""CEL conditions: load-time checks and total run-time evaluation (no servers)."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy.adapter import json_to_cel

from eventbus._errors import RuleError
from eventbus.rules import _cel
from eventbus.rules._cel import (
    MAX_MACRO_STEPS,
    Condition,
    OnFirstUse,
    Verdict,
    _celpy_context,
    _env,
    _runner,
    activation,
    compile_condition,
)

TABLE = yaml.safe_load((Path(__file__).parent / "data" / "cel_cases.yaml").read_text())
EVENT: dict[str, Any] = TABLE["event"]
RUNS = [c for c in TABLE["cases"] if "outcome" in c]
LOAD_ERRORS = [c for c in TABLE["cases"] if "load_error" in c]


@pytest.mark.parametrize("case", RUNS, ids=[c["expr"] for c in RUNS])
def test_evaluation(case: dict[str, str]) -> None:
    condition = compile_condition(case["expr"])
    verdict, reason = condition.evaluate(activation(EVENT))
    assert verdict is Verdict(case["outcome"])
    assert bool(reason) == (verdict in (Verdict.ERROR, Verdict.NOT_BOOL))
    assert case.get("reason", "") in reason
    assert "NotImplementedType" not in reason and "<class" not in reason


@pytest.mark.parametrize("case", LOAD_ERRORS, ids=[c["expr"] for c in LOAD_ERRORS])
def test_load_errors(case: dict[str, str]) -> None:
    with pytest.raises(RuleError) as caught:
        compile_condition(case["expr"])
    assert case["load_error"] in caught.value.message
    assert "NotImplementedType" not in caught.value.message
    # The rule compiler adds file, line and rule; the condition knows none of them.
    assert (caught.value.file, caught.value.line, caught.value.rule) == (None, None, None)


def test_uses_the_compiled_runner() -> None:
    # `%` is left to cel-python: no fast path, so its runner is built at load
    condition = compile_condition("event.data.n % 2 == 0")
    assert condition.fast is None
    assert isinstance(condition.runner, celpy.CompiledRunner)


@pytest.mark.parametrize(
    ("source", "runner"),
    [
        ("event.data.n > 1", celpy.CompiledRunner),
        ("has(event.data.n) && event.data.n > 1", celpy.InterpretedRunner),
    ],
)
def test_cel_python_runs_a_fast_condition_only_once_the_fast_path_is_unsure(
    source: str, runner: type
) -> None:
    condition = compile_condition(source)
    assert condition.fast is not None and isinstance(condition.runner, OnFirstUse)
    assert condition.evaluate(activation({"data": {"n": 5}})) == (Verdict.MATCH, "")
    assert condition.evaluate(activation({"data": {"n": 0}})) == (Verdict.NO_MATCH, "")
    assert not condition.runner.built  # the fast path answered both
    verdict, reason = condition.evaluate(activation({"data": {"n": "five"}}))
    assert verdict is Verdict.ERROR and "no such overload" in reason, reason
    assert condition.runner.built and isinstance(condition.runner.get(), runner)
    assert condition.evaluate(activation({"data": {"n": 5}})) == (Verdict.MATCH, "")


def test_one_activation_serves_many_conditions() -> None:
    context = activation(EVENT)
    conditions = [compile_condition(c["expr"]) for c in RUNS]
    assert [c.evaluate(context)[0].value for c in conditions] == [c["outcome"] for c in RUNS]


def test_error_reason_names_the_problem() -> None:
    verdict, reason = compile_condition('event.data.coupon == "X"').evaluate(activation(EVENT))
    assert verdict is Verdict.ERROR
    assert "coupon" in reason


def test_evaluation_survives_odd_events() -> None:
    condition = compile_condition("event.data.total > 1")
    for event in ({}, {"data": None}, {"data": "text"}, {"data": [1, 2]}, {"data": {"total": {}}}):
        assert condition.evaluate(activation(event))[0] is Verdict.ERROR


def test_activation_matches_cel_pythons_own_conversion() -> None:
    event = {**EVENT, "extra": {"flag": True, "ratio": 0.5, "neg": -3, "list": [[1], {"a": None}]}}
    converted = activation(event).converted(_celpy_context)["event"]
    assert converted == json_to_cel(event)
    assert repr(converted) == repr(json_to_cel(event))


def test_integers_beyond_int64_become_doubles() -> None:
    context = activation({"data": {"big": 2**70, "small": -(2**70)}})
    assert compile_condition("event.data.big > 1.0e21").evaluate(context)[0] is Verdict.MATCH
    assert compile_condition("event.data.small < 0.0").evaluate(context)[0] is Verdict.MATCH


def test_compiled_runner_works_even_after_a_default_environment() -> None:
    # cel-python shares one parser per process: a fresh interpreter shows the import order.
    code = (
        "import celpy; celpy.Environment()\n"
        "from eventbus.rules._cel import activation, compile_condition\n"
        "print(compile_condition('event.a == 1').evaluate(activation({'a': 1}))[0].value)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "match\n"), done.stderr


def test_a_decimal_with_a_leading_zero_runs_on_the_interpreter() -> None:
    # cel-python's transpiler writes `010` as a Python literal, which Python refuses; the
    # condition loaded with a SyntaxError traceback before.
    condition = compile_condition("event.data.n == 010")
    assert isinstance(condition.runner, celpy.InterpretedRunner)
    assert condition.evaluate(activation({"data": {"n": 10}})) == (Verdict.MATCH, "")
    assert condition.evaluate(activation({"data": {"n": 8}})) == (Verdict.NO_MATCH, "")


@pytest.mark.parametrize("interpreted", [False, True], ids=["compiled", "interpreted"])
@pytest.mark.parametrize("symbol", ["||", "&&"])
def test_a_chain_of_errors_on_cel_python_gives_one_short_reason(
    interpreted: bool, symbol: str
) -> None:
    # Each operand reads a field of a missing field, which the fast path leaves to cel-python.
    # cel-python's own text for the error of two errors holds both, escaped again at each level:
    # it doubles per operator (8 MB at 20 operands, 3.6 GiB and 29 s at 26).
    source = f" {symbol} ".join(f"event.data.gone{i}.field == 1" for i in range(22))
    tree = _env().compile(source)
    condition = Condition(source, _runner(tree, interpreted=interpreted))
    verdict, reason = condition.evaluate(activation(EVENT))
    assert verdict is Verdict.ERROR
    assert "gone0" in reason and len(reason) < 100
    # the same through compile_condition, where the fast path is unsure and asks cel-python
    verdict, reason = compile_condition(source).evaluate(activation(EVENT))
    assert verdict is Verdict.ERROR and "gone0" in reason and len(reason) < 100


@pytest.mark.parametrize("interpreted", [False, True], ids=["compiled", "interpreted"])
def test_logic_on_cel_python_keeps_its_answers(interpreted: bool) -> None:
    cases = {
        "event.data.currency || event.data.currency": "no such overload: string || string",
        "event.data.total && event.data.gone": "no such member in mapping",
        "event.data.gone || event.data.total": "no such member in mapping",
        "event.data.gone || true": "",
        "event.data.gone && false": "",
        "true && event.data.gone": "no such member in mapping",
    }
    for source, expected in cases.items():
        condition = Condition(source, _runner(_env().compile(source), interpreted=interpreted))
        verdict, reason = condition.evaluate(activation(EVENT))
        if expected:
            assert verdict is Verdict.ERROR and expected in reason, source
        else:
            assert verdict in (Verdict.MATCH, Verdict.NO_MATCH), source


@pytest.mark.parametrize("macro", ["exists", "all"])
def test_a_macro_over_failing_elements_on_the_interpreter_gives_one_short_reason(
    macro: str,
) -> None:
    # has() puts a condition on cel-python's interpreter, whose all() and exists() combined
    # the elements' errors with cel-python's own || and &&: 134 MB of reason at 24 elements.
    source = f"has(event.data.items) && event.data.items.{macro}(x, x.gone == 1)"
    event = {"data": {"items": [{"sku": "a"}] * 24}}
    verdict, reason = compile_condition(source).evaluate(activation(event))
    assert verdict is Verdict.ERROR and "gone" in reason and len(reason) < 100


@pytest.mark.parametrize(
    "items",
    [
        [],
        [{"n": 1}],
        [{"n": 2}],
        [{"m": 1}],
        [{"m": 1}, {"n": 1}],
        [{"n": 2}, {"m": 1}],
        [1, {"n": 1}],
    ],
)
@pytest.mark.parametrize("macro", ["exists", "all"])
def test_macros_on_the_interpreter_keep_cel_pythons_verdicts(macro: str, items: list[Any]) -> None:
    source = f"has(event.data.items) && event.data.items.{macro}(x, x.n == 1)"
    tree = _env().compile(source)
    ours = Condition(source, _runner(tree, interpreted=True))
    stock = Condition(source, celpy.InterpretedRunner(_env(), tree))
    context = activation({"data": {"items": items}})
    assert ours.evaluate(context)[0] is stock.evaluate(context)[0]


@pytest.mark.parametrize("interpreted", [False, True], ids=["compiled", "interpreted"])
@pytest.mark.parametrize(
    "source",
    [
        "event.data.items.exists(i, event.data.blocked.exists(b, b == i))",
        "event.data.items.map(i, event.data.blocked.filter(b, b == i)).size() > 0",
        "event.data.items.all(i, event.data.blocked.exists_one(b, b == i))",
    ],
)
def test_macros_stop_at_their_budget(source: str, interpreted: bool) -> None:
    # Two nested macros over lists of 1,000 (an 8.9 KB event) held the router's loop 46 s;
    # lists of 25,000 fit in an event.
    event = {"data": {"items": list(range(1000)), "blocked": list(range(-1000, 0))}}
    condition = Condition(source, _runner(_env().compile(source), interpreted=interpreted))
    verdict, reason = condition.evaluate(activation(event))
    assert verdict is Verdict.ERROR
    assert reason.startswith("evaluation stopped: "), reason
    # within budget, as before: 30 x 30 steps, the 900th finding it
    small = {"data": {"items": list(range(30)), "blocked": [29]}}
    expected = Verdict.NO_MATCH if ".all(" in source else Verdict.MATCH
    assert condition.evaluate(activation(small))[0] is expected


@pytest.mark.parametrize("interpreted", [False, True], ids=["compiled", "interpreted"])
def test_macros_nested_in_macros_spend_the_budget_too(
    interpreted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the interpreter (conditions calling has()), a macro's element ran on a plain
    # cel-python evaluator: the macros nested in it were not counted, and three nested over
    # lists of 30, 60 and 100 items (a 0.4 KB event) took 5.3 s, the outer one's 30 elements
    # too few for the time to be checked.
    source = (
        "has(event.data.a) && event.data.a.all(x, event.data.b.all(y, "
        "event.data.c.all(z, x + y + z >= 0)))"
    )
    event = {"data": {"a": list(range(30)), "b": list(range(60)), "c": list(range(100))}}
    # the steps alone stop it here (the inner ones counted), whatever this machine's speed
    monkeypatch.setattr(_cel, "MAX_EVALUATION_SECONDS", 120.0)
    condition = Condition(source, _runner(_env().compile(source), interpreted=interpreted))
    verdict, reason = condition.evaluate(activation(event))
    assert verdict is Verdict.ERROR
    assert reason == f"evaluation stopped: more than {MAX_MACRO_STEPS} macro steps", reason


@pytest.mark.parametrize(
    "source",
    ["(" * 300 + "event.x == 1" + ")" * 300, "!" * 2000 + "true", "[" * 300 + "]" * 300 + " == 1"],
)
def test_a_condition_nested_too_deeply_is_a_rule_error(source: str) -> None:
    # RecursionError raised out of the whole load: the other rules' errors went unreported
    with pytest.raises(RuleError, match="nested too deeply"):
        compile_condition(source)


def _verdict(condition: Condition, event: Any) -> Verdict:
    return condition.evaluate(event)[0]


def _nested(levels: int, call: Callable[[], Verdict]) -> Verdict:
    return call() if levels == 0 else _nested(levels - 1, call)


_HAS = "has(event.data.n) && "  # a condition calling has() runs on cel-python's interpreter


@pytest.mark.parametrize(
    "chain",
    [
        lambda n: " || ".join(f"event.data.n == {i}" for i in range(n)),
        lambda n: " && ".join(["event.data.n >= 0"] * n),
        lambda n: " + ".join(["event.data.n"] * n) + " == 0",
        lambda n: "!" * (n - n % 2) + "true",
        lambda n: " || ".join([*(f"has(event.data.x{i})" for i in range(n)), "event.data.n == 0"]),
        lambda n: _HAS + "(" * n + "event.data.n" + " + 1)" * n + " > 0",
        lambda n: _HAS + "!(" * (n - n % 2) + "event.data.n == 0" + ")" * (n - n % 2),
        lambda n: _HAS + "int(" * n + "event.data.n" + ")" * n + " == 0",
        lambda n: _HAS + "(event.data.n == 0 ? " * n + "true" + " : false)" * n,
        lambda n: "size(" + "[" * n + "event.data.n" + "]" * n + ") == 1",
        lambda n: "size(" + "{'a': " * n + "event.data.n" + "}" * n + ") == 1",
        lambda n: _HAS + "[1].exists(x, " * n + "event.data.n == 0" + ")" * n,
    ],
    ids=[
        *("or", "and", "sum", "not", "has", "parens", "not-calls", "int", "ternary", "lists"),
        *("maps", "macros"),
    ],
)
def test_a_condition_either_evaluates_or_is_refused_at_load(chain: Callable[[int], str]) -> None:
    # 830 || comparisons, or 45 nested parentheses after a has(), loaded and then failed on
    # every event (maximum recursion depth): the deepest that loads must evaluate, on both of
    # cel-python's runners, with the router's calls (and more) on the stack below it
    deepest = None
    for n in range(5, 1000, 5):
        try:
            compile_condition(chain(n))
        except RuleError as exc:
            assert "nested too deeply" in str(exc), exc
            break
        deepest = chain(n)
    assert deepest is not None and n < 1000
    event = activation({"data": {"n": 0}})
    for interpreted in (False, True):
        runner = Condition(deepest, _runner(_env().compile(deepest), interpreted=interpreted))
        assert _nested(250, functools.partial(_verdict, runner, event)) is Verdict.MATCH


@pytest.mark.parametrize("interpreted", [False, True], ids=["compiled", "interpreted"])
def test_a_field_of_a_value_without_fields_is_a_readable_error(interpreted: bool) -> None:
    # event.data.total on a text body: "'StringType' object has no attribute 'get'", Python's
    # own words, reached the log and the sandbox
    source = "event.data.total > 5"
    condition = Condition(source, _runner(_env().compile(source), interpreted=interpreted))
    verdict, reason = condition.evaluate(activation({"data": "text"}))
    assert verdict is Verdict.ERROR
    assert "'string' does not support field selection" in reason, reason
    assert "attribute" not in reason, reason
    if not interpreted:  # (the interpreter words it itself)
        verdict, reason = condition.evaluate(activation({"data": None}))
        assert reason == "type 'null_type' does not support field selection", reason


def test_conditions_run_on_two_threads_each_see_their_own_event() -> None:
    # A large event's rules run on the routing thread while the loop routes small ones: the
    # compiled runner's one namespace held the activation being evaluated, and an evaluation
    # on one thread read the other's event (the verdict of another event).
    condition = compile_condition("event.data.n % 2 == 0")  # on the compiled runner
    assert condition.fast is None
    wrong: list[int] = []

    def evaluate(n: int) -> None:
        context = activation({"data": {"n": n}})
        for _ in range(3000):
            verdict, _ = condition.evaluate(context)
            if verdict is not (Verdict.MATCH if n % 2 == 0 else Verdict.NO_MATCH):
                wrong.append(n)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=evaluate, args=(n,)) for n in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []
