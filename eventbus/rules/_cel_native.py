"""CEL ``when`` conditions on cel-expr-python, the official (C++) CEL runtime, when the setting
``router.cel`` asks for it (the ``fast-cel`` extra).

An accelerated evaluator behind ``_cel``'s interface: ``compile_condition`` still parses and
checks every condition with cel-python (so the same conditions load, with the same errors) and
hands the accepted ones here; ``NativeCondition.evaluate`` returns the same ``Verdict``.
About 1.5-5 µs per evaluation against 20-200 µs on cel-python, and the event converts in C++
on the first evaluation, in a third to a half of cel-python's time (bench/cel_bench.py).

The two runtimes differ where cel-python departs from the CEL spec: numbers of different types
compare here (``event.data.total > 100.5`` with an integer total is true, an error there),
``has()`` of a field of a missing parent is an error here (false there), and more; docs/rules.md
lists them, tests/rules/test_cel_native.py pins them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cel_expr_python import cel

from eventbus.rules._cel import Activation, Condition, Verdict

__all__ = ["NativeCondition", "compile_native"]

_ENV = cel.NewEnv(variables={"event": cel.Type.DYN})
_ERROR = cel.Type.ERROR
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class NativeCondition(Condition):
    """A CEL expression over ``event`` compiled by cel-expr-python."""

    runner: Any  # a cel.Expression
    lists: bool = False
    """Whether it builds lists (``map``, ``filter``): see ``MAX_LIST_ITEMS``."""

    def evaluate(self, context: Activation) -> tuple[Verdict, str]:
        """Evaluate against an ``activation(event)``; never raises (as ``Condition.evaluate``)."""
        if self.lists and (longest := _longest_list(context.event)) > MAX_LIST_ITEMS:
            return Verdict.ERROR, (
                f"the event holds a list of {longest} items: map() and filter() take lists of "
                f"up to {MAX_LIST_ITEMS} on cel-expr-python"
            )
        try:
            value = self.runner.eval(context.converted(_activation))
            result = value.value()
            if type(result) is bool:
                return (Verdict.MATCH if result else Verdict.NO_MATCH), ""
            kind = value.type()
            if kind == _ERROR and result.startswith(_OUT_OF_INT64):
                value = self.runner.eval(context.converted(_activation_with_doubles))
                result, kind = value.value(), value.type()
                if type(result) is bool:
                    return (Verdict.MATCH if result else Verdict.NO_MATCH), ""
        # The runtime reports a failure as an error value, but a few (a literal map with a
        # repeated key) as an exception.
        except Exception as exc:
            return Verdict.ERROR, f"{type(exc).__name__}: {exc}"
        if kind == _ERROR:
            return Verdict.ERROR, str(result)
        return Verdict.NOT_BOOL, f"returned {kind.name().lower()}, not bool"


MAX_LIST_ITEMS = 2_000
"""The longest list of an event a condition calling ``map`` or ``filter`` is evaluated on:
this runtime builds their lists in quadratic time and memory, bounded only by its iteration
budget (9,999 items: 1.3 s and 1.6 GB on the router's loop for one event; 2,000: 0.11 s and
68 MB here).
Past it the evaluation is an error (the condition a failure, as past cel-python's budget)."""


def _longest_list(value: Any) -> int:
    """The length of the longest list in ``value`` (an event as parsed JSON)."""
    longest = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            longest = max(longest, len(item))
            stack.extend(item)
    return longest


def compile_native(source: str, *, lists: bool = False) -> NativeCondition | None:
    """Compile a condition that cel-python accepted, or ``None`` if this runtime cannot;
    ``lists``: it builds lists (see ``MAX_LIST_ITEMS``).

    Type checking is off: cel-python has none, so with it on this runtime would refuse
    conditions that load today (``true || 32``); the checks ``_cel`` runs stand instead.
    """
    try:
        return NativeCondition(source, _ENV.compile(source, disable_check=True), lists=lists)
    except RuntimeError:
        return None


# The runtime converts the event itself, in C++, on the first evaluation, and fails it for an
# integer outside int64 (this error); as on cel-python, such integers become doubles. They are
# rare, and looking for them first would cost a third of the evaluation, so the condition is
# evaluated again, on a converted copy, when the runtime reports one.
_OUT_OF_INT64 = "INVALID_ARGUMENT: Integer value '"


def _activation(event: dict[str, Any]) -> Any:
    return _ENV.Activation({"event": event})


def _activation_with_doubles(event: dict[str, Any]) -> Any:
    return _ENV.Activation({"event": _ints_to_doubles(event)})


def _ints_to_doubles(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {key: _ints_to_doubles(item) for key, item in value.items()}
    if kind is list:
        return [_ints_to_doubles(item) for item in value]
    if kind is int and not _INT64_MIN <= value <= _INT64_MAX:
        return float(value)
    return value
