"""CEL ``when`` conditions: compiled once at rule load, evaluated by the router after a pattern hit.

The router (``RuleSet.route``) asks a ``Condition`` only about events whose event pattern already
matched, and converts each event to CEL values at most once (``activation``), because the
conversion costs about as much as one evaluation. Conditions see the CloudEvent as ``event``.

cel-python parses and checks every condition; asked for (``native``), the accepted conditions
run on cel-expr-python, the official C++ runtime (``_cel_native``, the ``fast-cel`` extra).

Evaluation is total: a runtime error (missing field, type mismatch, division by zero) or a
non-bool result is "no match", reported through ``Verdict`` so that the caller counts and logs it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import re
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import celpy
import lark
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError, CELParser
from celpy.evaluation import CELEvalError, Evaluator, TranspilerTree, base_functions, eval_error

from eventbus._errors import RuleError
from eventbus.rules._cel_fast import SPANNING, Contained, FastCondition, Unsure, compile_fast

__all__ = ["Activation", "Condition", "OnFirstUse", "Verdict", "activation", "compile_condition"]

# cel-python's compiled runner (about 5x faster than its interpreter) transpiles has() to a plain
# Python bool, which its && / || / ?: then reject, so the usual guard
# `has(event.data.x) && event.data.x > 1` fails to evaluate. Conditions that call has() run on
# the interpreter, which gets it right; every other condition is compiled.

# Python types to CEL's names, most specific first (BoolType is an int, not an IntType).
_CEL_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (celtypes.BoolType, "bool"),
    (bool, "bool"),
    (celtypes.UintType, "uint"),
    (int, "int"),
    (float, "double"),
    (str, "string"),
    (bytes, "bytes"),
    (list, "list"),
    (dict, "map"),
    (celtypes.TimestampType, "timestamp"),
    (celtypes.DurationType, "duration"),
    (type(None), "null_type"),
    (celtypes.NullType, "null_type"),
)


def cel_type_name(value: object) -> str:
    """The CEL name of ``value``'s type (``string``, ``int``, ``map`` ...)."""
    for kind, name in _CEL_TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


_NO_OVERLOAD = "no such overload: "


def _typed(function: Callable[..., Any], symbol: str) -> Callable[..., Any]:
    """``function`` (an operator) whose TypeError names the CEL types involved.

    cel-python lets Python's own operators fail (``"a" + 1`` reports "int() argument must be
    ... not 'NotImplementedType'"); CEL says "no such overload" with the operand types, and so
    does this (both runners turn the TypeError into a CEL error; ``_reason`` reads it).
    """

    def checked(*args: Any) -> Any:
        try:
            return function(*args)
        except TypeError as exc:
            names = [cel_type_name(arg) for arg in args]
            if symbol == "[]":
                shown = f"{names[0]}[{names[1]}]"
            elif len(names) == 1:
                shown = f"{symbol}{names[0]}"
            else:
                shown = f" {symbol} ".join(names)
            # A plain TypeError: the compiled runner maps exception types by exact class.
            raise TypeError(_NO_OVERLOAD + shown) from exc

    return checked


_OPERATORS = {
    "add": ("_+_", "+"),
    "sub": ("_-_", "-"),
    "mul": ("_*_", "*"),
    "truediv": ("_/_", "/"),
    "mod": ("_%_", "%"),
    "getitem": ("_[_]", "[]"),
    "neg": ("-_", "-"),
}
_COMPARISONS = {
    "eq": ("_==_", "=="),
    "ne": ("_!=_", "!="),
    "lt": ("_<_", "<"),
    "le": ("_<=_", "<="),
    "gt": ("_>_", ">"),
    "ge": ("_>=_", ">="),
}
_NUMBERS = (celtypes.IntType, celtypes.UintType, celtypes.DoubleType)


def _no_bool_numbers(function: Callable[..., Any], symbol: str) -> Callable[..., Any]:
    """``function`` (an operator) that takes a bool for no number: cel-python's bool is a
    Python int, and ``event.data.qty == 1`` matched ``qty: true`` (``t > 0``, ``t + 1 == 2``
    too), where CEL has no such overload. As for other values of different types here
    (``int == double``, ``list == map``), it is a no-overload error (cel-expr-python: false
    for ``==``). A bool as a map key is left alone (``[]``)."""

    def checked(*args: Any) -> Any:
        if (
            symbol != "[]"
            and any(isinstance(arg, celtypes.BoolType) for arg in args)
            and (len(args) == 1 or any(isinstance(arg, _NUMBERS) for arg in args))
        ):
            names = f" {symbol} ".join(cel_type_name(arg) for arg in args)
            raise TypeError(_NO_OVERLOAD + (symbol + names if len(args) == 1 else names))
        return function(*args)

    return checked


_TYPED_OPERATORS = {
    name: _no_bool_numbers(_typed(getattr(operator, name), s), s)
    for name, (_, s) in _OPERATORS.items()
}
_TYPED_COMPARISONS = {
    f"bool_{name}": _no_bool_numbers(_typed(getattr(celpy.evaluation, f"bool_{name}"), s), s)
    for name, (_, s) in _COMPARISONS.items()
}


def _logic(combine: Callable[[Any, Any], Any], symbol: str) -> Callable[[Any, Any], Any]:
    """cel-python's ``||`` or ``&&`` (``combine``), with the error of two errors the first.

    cel-python writes the error of two error values as a text holding both as ``repr``s, whose
    quotes each level escapes again: the text doubles with every operator, so a chain of 26
    ``||``s over missing fields took 29 s and 3.6 GiB to say why it failed. The fast path
    (``_cel_fast._logic``) gives the first error's reason; so does this, for the conditions
    cel-python runs alone. Two operands that are neither bool nor error are no overload, named
    by type (their values might be megabytes).
    """

    def checked(x: Any, y: Any) -> Any:
        if isinstance(x, celtypes.BoolType) or isinstance(y, celtypes.BoolType):
            return combine(x, y)  # a bool decides, or passes the other side on as it is
        if isinstance(x, CELEvalError):
            return x
        if isinstance(y, CELEvalError):
            return y
        raise TypeError(f"{_NO_OVERLOAD}{cel_type_name(x)} {symbol} {cel_type_name(y)}")

    return checked


_TYPED_LOGIC = {
    "logical_or": _logic(celtypes.logical_or, "||"),
    "logical_and": _logic(celtypes.logical_and, "&&"),
}
# The interpreter looks operators up by their CEL names.
_TYPED_FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{cel: _TYPED_OPERATORS[name] for name, (cel, _) in _OPERATORS.items()},
    **{cel: _TYPED_COMPARISONS[f"bool_{name}"] for name, (cel, _) in _COMPARISONS.items()},
    "_||_": _TYPED_LOGIC["logical_or"],
    "_&&_": _TYPED_LOGIC["logical_and"],
}


MAX_MACRO_STEPS = 10_000
"""Elements a condition's macros (``all``, ``exists``, ``map`` ...) may visit in one evaluation,
nested macros counted by every inner element: two nested over a list of 1,000 items took 46 s
of the router's loop on cel-python."""
MAX_NESTING = 200
"""Operations a condition may nest, one in another (``a || b || c`` nests two), and
:data:`MAX_LEVELS` the levels of its syntax tree: cel-python evaluates each a few Python
calls deeper (its interpreter, which runs conditions calling ``has()``, about two per level),
and conditions deeper than Python's recursion allows loaded and then failed on every event
(830 ``||`` comparisons; 45 nested parentheses after a ``has()``; 45 nested lists). Both
bounds evaluated, on either of cel-python's runners, with 250 frames below them, for every
shape tried (chains of ``||``, ``&&``, ``+`` and ``!``; nested parentheses, calls, ternaries,
lists, maps and macros)."""
MAX_LEVELS = 400
MAX_EVALUATION_SECONDS = 0.25
"""And the time they may take (cel-python's interpreter visits as few as 5,000 a second)."""
_CHECK_TIME_EVERY = 64


class _OverBudget(BaseException):
    """A condition's evaluation spent its budget. A BaseException, so that no error handling
    of cel-python's (which makes an Exception an error value and goes on with the next element)
    keeps it from ending the whole evaluation at once."""


class _Budget(threading.local):
    """What the evaluation running now may still spend (evaluations are synchronous: one at a
    time per thread, each with its budget, reset by each; a large event is routed on a thread
    of its own, see ``eventbus.rules.routing``)."""

    steps = 0
    deadline = 0.0

    def reset(self) -> None:
        self.steps = MAX_MACRO_STEPS
        self.deadline = time.monotonic() + MAX_EVALUATION_SECONDS

    def spend(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _OverBudget(f"more than {MAX_MACRO_STEPS} macro steps")
        if self.steps % _CHECK_TIME_EVERY == 0 and time.monotonic() > self.deadline:
            self.steps = -1  # and every step after it
            raise _OverBudget(f"macros ran longer than {MAX_EVALUATION_SECONDS} s")


_BUDGET = _Budget()


def _budgeted(macro: Callable[..., Any]) -> Callable[..., Any]:
    """A macro of the compiled runner that spends a step per element it visits."""

    def run(activation: Any, bind: str, expr: Callable[..., Any], gen: Callable[..., Any]) -> Any:
        def counted(context: Any) -> Iterator[Any]:
            for item in gen(context):
                _BUDGET.spend()
                yield item

        return macro(activation, bind, expr, counted)

    return run


_BUDGETED_MACROS = {
    name: _budgeted(getattr(celpy.evaluation, name))
    for name in ("macro_all", "macro_exists", "macro_exists_one", "macro_filter", "macro_map")
}


def _patched(module: types.ModuleType, replace: Mapping[str, object]) -> types.ModuleType:
    copy = types.ModuleType(module.__name__)
    copy.__dict__.update(vars(module))
    copy.__dict__.update(replace)
    return copy


# The compiled runner's code calls `operator.add(...)`, `celpy.evaluation.bool_lt(...)` and
# `celpy.celtypes.logical_or(...)`; it runs in this namespace, where those names lead to the
# typed operators (nothing else changes).
_NAMESPACE: dict[str, Any] = {
    **vars(celpy.evaluation),
    "celpy": _patched(
        celpy,
        {
            "evaluation": _patched(celpy.evaluation, {**_TYPED_COMPARISONS, **_BUDGETED_MACROS}),
            "celtypes": _patched(celtypes, _TYPED_LOGIC),
        },
    ),
    "operator": _patched(operator, _TYPED_OPERATORS),
}


class _Namespaces(threading.local):
    """``_NAMESPACE``, a copy per thread (see ``_CompiledRunner.evaluate``)."""

    def __init__(self) -> None:
        self.namespace = dict(_NAMESPACE)


_SPACES = _Namespaces()


class _CompiledRunner(celpy.CompiledRunner):
    """cel-python's compiled runner, its code run in ``_NAMESPACE`` (type errors that name CEL
    types, see :func:`_typed`).

    This relies on how cel-python 0.5 builds and runs its transpiled code (``tp.base_activation``,
    ``tp.executable_code``, the result in ``CEL``, operators called as ``operator.add`` and
    ``celpy.evaluation.bool_lt``), which is why pyproject.toml pins cel-python below 0.6; the
    reason checks in tests/rules/data/cel_cases.yaml fail if a release changes it."""

    def evaluate(self, context: Any) -> Any:
        """As ``Transpiler.evaluate``, which runs the code in cel-python's own module namespace.
        Synchronous, so one namespace serves every condition of a thread; one per thread, as a
        large event's conditions run on the routing thread (two evaluations sharing one took
        each other's activation: the verdict of another event)."""
        tp = self.tp
        activation = tp.base_activation
        if context:
            activation = activation.clone()
            activation.identifiers.load_values(context)
        namespace = _SPACES.namespace
        namespace["base_activation"] = activation
        try:
            exec(tp.executable_code, namespace)
            value = namespace["CEL"]
        except Exception as exc:
            raise CELEvalError("evaluation error", type(exc), exc.args) from exc
        if isinstance(value, CELEvalError):
            raise value
        return value


class _Evaluator(Evaluator):
    """cel-python's interpreter, its ``all`` and ``exists`` combining the elements' results
    with ``_logic``. Its own call ``celtypes.logical_and``/``logical_or`` themselves, not the
    ``_&&_``/``_||_`` functions given to it: over a list of elements that each fail, the
    reason doubled per element (134 MB and 1.4 s at 24 elements of an event under 1 KB).
    Every macro spends a step of the budget per element (``_BUDGET``)."""

    def sub_evaluator(self, ast: lark.Tree[lark.Token]) -> Evaluator:
        """The evaluator of a macro's element expression: this one's kind, so the macros nested
        in it spend the budget too (cel-python's makes a plain ``Evaluator``: three nested over
        lists of 30, 60 and 100 items, a 0.4 KB event, ran 5.3 s past the 0.25 s budget, the
        outer macro's 30 elements too few for the time to be checked)."""
        return _Evaluator(ast, activation=self.activation)

    def build_macro_eval(self, child: lark.Tree[lark.Token]) -> Callable[[Any], Any]:
        return _counted(super().build_macro_eval(child))

    def build_ss_macro_eval(self, child: lark.Tree[lark.Token]) -> Callable[[Any], Any]:
        return _counted(super().build_ss_macro_eval(child))

    def member_dot_arg(self, tree: lark.Tree[lark.Token]) -> Any:
        method = str(tree.children[1])
        if method not in ("all", "exists"):
            return super().member_dot_arg(tree)
        items = self.visit(cast(lark.Tree[lark.Token], tree.children[0]))
        if isinstance(items, CELEvalError):
            return items
        combine = _TYPED_LOGIC["logical_and" if method == "all" else "logical_or"]
        # as cel-python does: every element is evaluated, a TypeError is an error value
        step = eval_error("no such overload", TypeError)(combine)
        return functools.reduce(
            step, map(self.build_ss_macro_eval(tree), items), celtypes.BoolType(method == "all")
        )


def _counted(element: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def counted(value: Any) -> Any:
        _BUDGET.spend()
        return element(value)

    return counted


class _InterpretedRunner(celpy.InterpretedRunner):
    """cel-python's interpreter runner, on ``_Evaluator``."""

    def evaluate(self, context: Any) -> Any:
        return _Evaluator(ast=self.ast, activation=self.new_activation()).evaluate(context)


@functools.cache
def _env() -> celpy.Environment:
    """The environment every condition compiles in, made at the first condition: building its
    parser takes 0.3 s, which every process paid at import (the CLI's, a worker restarted, a
    service whose rules hold no CEL).

    cel-python 0.5 builds its lark parser once per process, with the tree class of the first
    Environment created. The compiled runner (~5x faster) needs its own tree class, so this
    environment must be created before any default one; if one came first, the parser is
    rebuilt (its trees suit the interpreter too, TranspilerTree being a lark.Tree)."""
    shared = CELParser.CEL_PARSER
    if shared is not None and shared.options.tree_class is not TranspilerTree:
        CELParser.CEL_PARSER = None
    return celpy.Environment(runner_class=_CompiledRunner)


# The transpiler logs every evaluation error at ERROR; here such errors are expected ("no match")
# and the rule set counts them and logs them rate-limited instead.
logging.getLogger("celpy.Transpiler").setLevel(logging.CRITICAL)

_MACROS = frozenset({"all", "exists", "exists_one", "filter", "map"})
_GLOBAL_FUNCTIONS = frozenset(base_functions) | {"has", "dyn"}
_METHODS = frozenset(base_functions) | _MACROS
_TYPE_NAMES = frozenset(
    {"bool", "bytes", "double", "int", "list", "map", "null_type", "string", "type", "uint"}
)


class Verdict(Enum):
    """The result of one evaluation; only ``MATCH`` lets the event through."""

    MATCH = "match"
    NO_MATCH = "no_match"
    ERROR = "error"
    NOT_BOOL = "not_bool"


class OnFirstUse:
    """cel-python's runner of a condition that the fast path answers, built again from the
    source the first time the fast path is unsure: most conditions never need it, and its parse
    tree and program take ten times the fast path's memory (about 41 against 4 KB per
    condition, 167 against 49 objects for the collector to walk: at 10,000 conditions, 400 MB
    and a full collection of seconds)."""

    __slots__ = ("_interpreted", "_runner", "_source")

    def __init__(self, source: str, *, interpreted: bool) -> None:
        self._source = source
        self._interpreted = interpreted
        self._runner: celpy.Runner | None = None

    @property
    def built(self) -> bool:
        """Whether the runner was needed (and so built) yet."""
        return self._runner is not None

    def get(self) -> celpy.Runner:
        """The runner, built on the first call (the source compiled at load: it compiles)."""
        if self._runner is None:
            self._runner = _runner(_env().compile(self._source), interpreted=self._interpreted)
        return self._runner

    def evaluate(self, context: Any) -> Any:
        return self.get().evaluate(context)


@dataclass(frozen=True)
class Condition:
    """A compiled CEL expression over ``event`` (on cel-python; ``NativeCondition`` is the
    same on cel-expr-python)."""

    source: str
    runner: celpy.Runner | OnFirstUse
    fast: FastCondition | None = None
    """The same condition on plain JSON (``_cel_fast``), where it can be; asked first."""
    macros: bool = False
    """Whether it calls a macro (``all``, ``exists``, ...): each evaluation may spend its
    budget (see ``eventbus.rules.routing``)."""

    def evaluate(self, context: Activation) -> tuple[Verdict, str]:
        """Evaluate against an ``activation(event)``; never raises.

        Returns the verdict and, for ``ERROR`` and ``NOT_BOOL``, a short reason for the log.
        """
        if self.fast is not None:
            try:
                value = self.fast(context.event)
            except Contained as error:
                return Verdict.ERROR, error.reason  # an error value, as on cel-python
            except Unsure:
                pass  # cel-python says what it is
            else:
                if value is True:
                    return Verdict.MATCH, ""
                if value is False:
                    return Verdict.NO_MATCH, ""
        _BUDGET.reset()
        try:
            value = self.runner.evaluate(context.converted(_celpy_context))
        except _OverBudget as exc:
            return Verdict.ERROR, f"evaluation stopped: {exc}"
        except CELEvalError as exc:
            return Verdict.ERROR, _reason(exc)
        # A CEL error is a value in cel-python; it escapes as an exception only at the top.
        except Exception as exc:
            return Verdict.ERROR, f"{type(exc).__name__}: {exc}"
        if isinstance(value, bool | celtypes.BoolType):
            return (Verdict.MATCH if value else Verdict.NO_MATCH), ""
        return Verdict.NOT_BOOL, f"returned {cel_type_name(value)}, not bool"


def _reason(exc: CELEvalError) -> str:
    # CELEvalError nests (message, python type, args) tuples; the innermost args say the most.
    parts: list[str] = []
    args: Any = exc.args
    while isinstance(args, tuple) and args:
        if isinstance(args[0], str) and args[0].startswith(_NO_OVERLOAD):
            return _cel_names(args[0])  # an overload message: it names the types
        if isinstance(args[0], str):
            parts.append(args[0])
        args = args[2] if len(args) > 2 else None
    reason = ": ".join(dict.fromkeys(p for p in parts if p != "evaluation error")) or str(exc)
    return _cel_names(reason)


_CELTYPE_CLASS = re.compile(r"<class 'celpy\.celtypes\.(\w+)Type'>")
_CELTYPE_NAMES = {"Null": "null_type", "None": "null_type"}  # None: Python's, in its errors


def _cel_names(message: str) -> str:
    """``message`` with cel-python's own type classes (``<class 'celpy.celtypes.ListType'>``,
    from overloads it checks itself, such as ``!``) written as CEL's names (``list``)."""
    named = _CELTYPE_CLASS.sub(
        lambda m: _CELTYPE_NAMES.get(m.group(1), m.group(1).lower()), message
    )
    # a field selected on a value that has none (event.data.total on a text body): cel-python
    # let Python's own AttributeError through
    return _NO_FIELDS.sub(
        lambda m: (
            f"type '{_CELTYPE_NAMES.get(m.group(1), m.group(1).lower())}' does not "
            "support field selection"
        ),
        named,
    )


_NO_FIELDS = re.compile(r"'(\w+)Type' object has no attribute '\w+'")


class Activation:
    """One event as conditions see it, converted for each runtime on first use, then kept."""

    __slots__ = ("_forms", "event")

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        self._forms: dict[Callable[[dict[str, Any]], Any], Any] = {}

    def converted(self, convert: Callable[[dict[str, Any]], Any]) -> Any:
        """``convert(event)``, computed once per activation."""
        try:
            return self._forms[convert]
        except KeyError:
            form = self._forms[convert] = convert(self.event)
            return form


def activation(event: dict[str, Any]) -> Activation:
    """The CEL context for one event; each runtime converts it once, when first asked.

    Integers outside CEL's int64 range become doubles. Evaluating raises ``ValueError`` only
    for values that are not JSON (events on the bus always are).
    """
    return Activation(event)


def _celpy_context(event: dict[str, Any]) -> dict[str, Any]:
    return {"event": _to_cel(event)}


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_new_str, _new_int, _new_float, _update = str.__new__, int.__new__, float.__new__, dict.update


def _to_cel(value: Any) -> Any:
    # json_to_cel's result, 4x faster: the celtypes constructors re-check their argument (and
    # IntType builds a range-checking closure per call), MapType copies key by key in Python.
    # The values here are already of the exact JSON types, so the checks are done once here.
    kind = type(value)
    if kind is str:
        return _new_str(celtypes.StringType, value)
    if kind is dict:
        mapping = celtypes.MapType()
        _update(mapping, {_new_str(celtypes.StringType, k): _to_cel(v) for k, v in value.items()})
        return mapping
    if kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return _new_int(celtypes.IntType, value)
        return celtypes.DoubleType(value)
    if kind is float:
        return _new_float(celtypes.DoubleType, value)
    if kind is list:
        return celtypes.ListType([_to_cel(item) for item in value])
    if kind is bool:
        return celtypes.BoolType(value)
    if value is None:
        return None
    return json_to_cel(value)


def _walk(tree: lark.Tree[lark.Token]) -> Iterator[lark.Tree[lark.Token]]:
    yield tree
    for child in tree.children:
        if isinstance(child, lark.Tree):
            yield from _walk(child)


def _nesting(tree: lark.Tree[lark.Token]) -> tuple[int, int]:
    """How deep ``tree`` nests: the most operations on a path from the root, one in another
    (nodes of more than one child: an operator and its operands, a call and its arguments),
    and the most levels. Iterative: the tree may be deeper than Python's recursion."""
    operations = levels = 0
    stack = [(tree, 0, 1)]
    while stack:
        node, ops, depth = stack.pop()
        ops += len(node.children) > 1
        operations, levels = max(operations, ops), max(levels, depth)
        stack.extend((c, ops, depth + 1) for c in node.children if isinstance(c, lark.Tree))
    return operations, levels


def _first_token(tree: lark.Tree[lark.Token]) -> str:
    child = tree.children[0]
    return str(child) if isinstance(child, lark.Token) else ""


def _bare_ident(tree: lark.Tree[lark.Token] | lark.Token) -> str:
    if isinstance(tree, lark.Token):
        return ""
    while (
        tree.data != "ident" and len(tree.children) == 1 and isinstance(tree.children[0], lark.Tree)
    ):
        tree = tree.children[0]
    return _first_token(tree) if tree.data == "ident" else ""


def _check_names(tree: lark.Tree[lark.Token]) -> None:
    # cel-python has no type checker: catch typos in names before the first event does.
    # Macro variables (the `x` of `list.exists(x, ...)`) are allowed anywhere, which is
    # slightly lax but never rejects a valid condition.
    bound = {
        _bare_ident(args.children[0])
        for node in _walk(tree)
        if node.data == "member_dot_arg"
        and str(node.children[1]) in _MACROS
        and len(node.children) > 2
        and isinstance(args := node.children[2], lark.Tree)
    }
    for node in _walk(tree):
        if node.data == "ident":
            name = _first_token(node)
            if name != "event" and name not in _TYPE_NAMES and name not in bound:
                raise RuleError(f"unknown name {name!r}: conditions see only 'event'")
        elif node.data == "ident_arg":
            name = _first_token(node)
            if name not in _GLOBAL_FUNCTIONS:
                raise RuleError(f"unknown function {name}()")
        elif node.data == "member_dot_arg":
            name = str(node.children[1])
            if name not in _METHODS:
                raise RuleError(f"unknown method .{name}()")


def _with_variables(tree: lark.Tree[lark.Token]) -> set[int]:
    """The ids of the nodes that contain a name (``event`` or a macro variable)."""
    found: set[int] = set()

    def visit(node: lark.Tree[lark.Token]) -> bool:
        named = node.data == "ident"
        for child in node.children:
            if isinstance(child, lark.Tree) and visit(child):
                named = True
        if named:
            found.add(id(node))
        return named

    visit(tree)
    return found


def _lone_literal(tree: lark.Tree[lark.Token]) -> bool:
    while len(tree.children) == 1 and isinstance(tree.children[0], lark.Tree):
        tree = tree.children[0]
    return tree.data == "literal"


def _number_out_of_range(tree: lark.Tree[lark.Token]) -> str | None:
    """Why the lone integer literal ``tree`` is none CEL takes (past int64, or uint64 with
    ``u``), read in Python (evaluating each literal with cel-python slowed the load by a
    third); None for any other literal."""
    literal = next(tree.find_data("literal"), None)
    token = literal.children[0] if literal is not None and literal.children else None
    if not isinstance(token, lark.Token) or token.type not in ("INT_LIT", "UINT_LIT"):
        return None
    unsigned = token.type == "UINT_LIT"
    text = token.value[:-1] if unsigned else token.value
    digits = text.lstrip("-")
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 10)
    value = -value if text.startswith("-") else value
    if unsigned and not 0 <= value < 2**64:
        return "past the uint64 range"
    if not unsigned and not -(2**63) <= value < 2**63:
        return "past the int64 range"
    return None


def _check_patterns(tree: lark.Tree[lark.Token]) -> None:
    """Refuse a constant regular expression of ``matches`` that does not compile: it failed
    every evaluation (re2 writing its error to standard error each time)."""
    for node in tree.iter_subtrees():
        if node.data == "member_dot_arg" and len(node.children) == 3:
            name, arguments = node.children[1], node.children[2]
        elif node.data == "ident_arg" and len(node.children) == 2:
            name, arguments = node.children[0], node.children[1]
        else:
            continue
        if str(name) != "matches" or not isinstance(arguments, lark.Tree):
            continue
        pattern = arguments.children[-1]
        if not isinstance(pattern, lark.Tree) or not _lone_literal(pattern):
            continue
        literal = next(pattern.find_data("literal")).children[0]
        strings = ("STRING_LIT", "MLSTRING_LIT")
        if not isinstance(literal, lark.Token) or literal.type not in strings:
            continue
        try:
            _env().program(_env().compile(f"''.matches({literal})")).evaluate({})
        except CELEvalError as exc:
            raise RuleError(f"matches({literal}): not a valid regular expression") from exc


def _constant_subtrees(
    tree: lark.Tree[lark.Token], variable: set[int]
) -> Iterator[lark.Tree[lark.Token]]:
    # Top-down: only the largest constant sub-expressions are yielded.
    if tree.data in SPANNING and id(tree) not in variable:
        yield tree
        return
    for child in tree.children:
        if isinstance(child, lark.Tree):
            yield from _constant_subtrees(child, variable)


def _check_constants(source: str, tree: lark.Tree[lark.Token]) -> None:
    # Sub-expressions made only of literals evaluate the same for every event: evaluating them
    # now turns an obvious type error such as `"a" + 1` into a load error.
    for node in _constant_subtrees(tree, _with_variables(tree)):
        if node is not tree and _lone_literal(node):
            # the `3` of `x < 3` cannot fail, but `9223372036854775808` failed every time
            if (past := _number_out_of_range(node)) is not None:
                literal = next(node.find_data("literal")).children[0]
                raise RuleError(f"{str(literal)!r} can never be evaluated: {past}")
            continue
        start, end = getattr(node.meta, "start_pos", None), getattr(node.meta, "end_pos", None)
        if start is None or end is None:
            continue  # the parser leaves some ternary branches without positions
        text = source[start:end]
        try:
            value = _env().program(_env().compile(text)).evaluate({})
        except (CELParseError, SyntaxError):
            # SyntaxError: the transpiler writes `010` as invalid Python (see _runner); the
            # interpreter runs it
            continue
        except CELEvalError as exc:
            raise RuleError(f"{text!r} can never be evaluated: {_reason(exc)}") from exc
        if node is tree and not isinstance(value, bool | celtypes.BoolType):
            raise RuleError(f"condition is always {cel_type_name(value)}, not bool")


def builds_lists(tree: lark.Tree[lark.Token]) -> bool:
    """Whether the parsed condition calls a macro that builds a list (``map``, ``filter``)."""
    return _calls(tree, frozenset({"map", "filter"}))


def _calls(tree: lark.Tree[lark.Token], methods: frozenset[str]) -> bool:
    """Whether the parsed condition calls one of ``methods``."""
    return any(
        sub.data == "member_dot_arg"
        and any(isinstance(child, lark.Token) and child.value in methods for child in sub.children)
        for sub in tree.iter_subtrees()
    )


def compile_condition(source: str, *, native: bool = False) -> Condition:
    """Compile a CEL condition once, for cel-python, or with ``native`` for cel-expr-python
    (cel-python for the rare condition that runtime cannot compile).

    Raises ``RuleError`` without a location (the caller adds it) for a syntax error (with line
    and column inside the expression), an unknown variable, function or method, or a
    literal-only sub-expression that can never evaluate (``"a" + 1``). Type errors that depend
    on the event surface at run time. With ``native``, raises ``ImportError`` when
    cel-expr-python is not installed.
    """
    try:
        return _compile(source, native)
    except RecursionError:
        # cel-python's tree walks recurse: 300 nested parentheses or lists, 2,000 `!` or
        # `&&`, raised out of the whole load (the other rules' errors unreported, a reload 500)
        raise RuleError("the condition is nested too deeply to compile") from None


def _compile(source: str, native: bool) -> Condition:
    try:
        tree = _env().compile(source)
    except CELParseError as exc:
        line, column = getattr(exc, "line", None), getattr(exc, "column", None)
        where = f" at line {line} column {column}" if line and column else ""
        first = str(exc.args[0]).strip().splitlines() if exc.args else []
        detail = f": {first[0]}" if first else ""
        raise RuleError(f"CEL syntax error{where}{detail}") from exc
    operations, levels = _nesting(tree)
    if operations > MAX_NESTING or levels > MAX_LEVELS:
        raise RuleError(
            f"the condition is nested too deeply: {operations} operations one in another (at "
            f"most {MAX_NESTING}), {levels} levels of syntax (at most {MAX_LEVELS}); a long "
            "chain of || comparisons reads better as `x in [a, b, ...]`"
        )
    _check_names(tree)
    _check_constants(source, tree)
    _check_patterns(tree)
    macros = _calls(tree, _MACROS)
    if native:
        from eventbus.rules._cel_native import compile_native

        if (compiled := compile_native(source, lists=builds_lists(tree))) is not None:
            return dataclasses.replace(compiled, macros=macros)
    interpreted = _calls_has(tree)
    # The fast path is built for the runner cel-python would use. Should the transpiler fail to
    # write the condition (``_runner``), the interpreter runs it instead; the fast path built
    # for the compiled runner answers a subset of what it answers for the interpreter, with the
    # same values (it only leaves more to cel-python: ``_cel_fast._Compiler._target``).
    fast = compile_fast(tree, interpreted=interpreted)
    if fast is not None:
        return Condition(source, OnFirstUse(source, interpreted=interpreted), fast, macros)
    return Condition(source, _runner(tree, interpreted=interpreted), macros=macros)


def _runner(tree: lark.Tree[lark.Token], *, interpreted: bool) -> celpy.Runner:
    """cel-python's compiled runner, or its interpreter for conditions that call has() and for
    those its transpiler cannot write as Python."""
    if not interpreted:
        try:
            return _env().program(tree)
        except SyntaxError:
            # The transpiler writes some valid CEL as invalid Python (`010`, a decimal with a
            # leading zero, becomes the Python literal 010): the interpreter reads it right.
            pass
    return _InterpretedRunner(_env(), tree, _TYPED_FUNCTIONS)


def _calls_has(tree: lark.Tree[lark.Token]) -> bool:
    return any(node.data == "ident_arg" and _first_token(node) == "has" for node in _walk(tree))
