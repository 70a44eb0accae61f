"""CEL ``when`` conditions: compiled once at rule load, evaluated by the router after a pattern hit.

The router (``RuleSet.route``) asks a ``Condition`` only about events whose event pattern already
matched, and converts each event to CEL values at most once (``activation``), because the
conversion costs about as much as one evaluation. Conditions see the CloudEvent as ``event``.

Evaluation is total: a runtime error (missing field, type mismatch, division by zero) or a
non-bool result is "no match", reported through ``Verdict`` so that the caller counts and logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError, CELParser
from celpy.evaluation import CELEvalError, TranspilerTree, base_functions

from eventbus._errors import RuleError

__all__ = ["Condition", "Verdict", "activation", "compile_condition"]

# cel-python's compiled runner (about 5x faster than its interpreter) transpiles has() to a plain
# Python bool, which its && / || / ?: then reject, so the usual guard
# `has(event.data.x) && event.data.x > 1` fails to evaluate. Conditions that call has() run on
# the interpreter, which gets it right; every other condition is compiled.
# cel-python 0.5 builds its lark parser once per process, with the tree class of the first
# Environment created. The compiled runner (~5x faster) needs its own tree class, so this
# environment must be created before any default one; if one came first, the parser is rebuilt
# (its trees suit the interpreter too, TranspilerTree being a lark.Tree).
_SHARED = CELParser.CEL_PARSER
if _SHARED is not None and _SHARED.options.tree_class is not TranspilerTree:
    CELParser.CEL_PARSER = None
_ENV = celpy.Environment(runner_class=celpy.CompiledRunner)

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


@dataclass(frozen=True)
class Condition:
    """A compiled CEL expression over ``event``."""

    source: str
    runner: celpy.Runner

    def evaluate(self, context: dict[str, Any]) -> tuple[Verdict, str]:
        """Evaluate against an ``activation(event)``; never raises.

        Returns the verdict and, for ``ERROR`` and ``NOT_BOOL``, a short reason for the log.
        """
        try:
            value = self.runner.evaluate(context)
        except CELEvalError as exc:
            return Verdict.ERROR, _reason(exc)
        # A CEL error is a value in cel-python; it escapes as an exception only at the top.
        except Exception as exc:
            return Verdict.ERROR, f"{type(exc).__name__}: {exc}"
        if isinstance(value, bool | celtypes.BoolType):
            return (Verdict.MATCH if value else Verdict.NO_MATCH), ""
        return Verdict.NOT_BOOL, f"returned {type(value).__name__}, not bool"


def _reason(exc: CELEvalError) -> str:
    # CELEvalError nests (message, python type, args) tuples; the innermost args say the most.
    parts: list[str] = []
    args: Any = exc.args
    while isinstance(args, tuple) and args:
        if isinstance(args[0], str):
            parts.append(args[0])
        args = args[2] if len(args) > 2 else None
    return ": ".join(dict.fromkeys(p for p in parts if p != "evaluation error")) or str(exc)


def activation(event: dict[str, Any]) -> dict[str, Any]:
    """The CEL context for one event: ``{"event": <event as CEL values>}``.

    Integers outside CEL's int64 range become doubles. Raises ``ValueError`` only for values
    that are not JSON (events on the bus always are).
    """
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


def _constant_subtrees(
    tree: lark.Tree[lark.Token], variable: set[int]
) -> Iterator[lark.Tree[lark.Token]]:
    # Top-down: only the largest constant sub-expressions are yielded.
    if tree.data in _COMPLETE and id(tree) not in variable:
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
            continue  # the `3` of `x < 3` cannot fail
        start, end = getattr(node.meta, "start_pos", None), getattr(node.meta, "end_pos", None)
        if start is None or end is None:
            continue  # the parser leaves some ternary branches without positions
        text = source[start:end]
        try:
            value = _ENV.program(_ENV.compile(text)).evaluate({})
        except CELParseError:
            continue
        except CELEvalError as exc:
            raise RuleError(f"{text!r} can never be evaluated: {_reason(exc)}") from exc
        if node is tree and not isinstance(value, bool | celtypes.BoolType):
            raise RuleError(f"condition is always {type(value).__name__}, not bool")


# Grammar nodes that span a whole sub-expression (operator nodes such as `addition_add` span
# only the left operand and the operator).
_COMPLETE = frozenset(
    {
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
    }
)


def compile_condition(source: str) -> Condition:
    """Compile a CEL condition once.

    Raises ``RuleError`` without a location (the caller adds it) for a syntax error (with line
    and column inside the expression), an unknown variable, function or method, or a
    literal-only sub-expression that can never evaluate (``"a" + 1``). Type errors that depend
    on the event surface at run time.
    """
    try:
        tree = _ENV.compile(source)
    except CELParseError as exc:
        line, column = getattr(exc, "line", None), getattr(exc, "column", None)
        where = f" at line {line} column {column}" if line and column else ""
        first = str(exc.args[0]).strip().splitlines() if exc.args else []
        detail = f": {first[0]}" if first else ""
        raise RuleError(f"CEL syntax error{where}{detail}") from exc
    _check_names(tree)
    _check_constants(source, tree)
    if _calls_has(tree):
        return Condition(source=source, runner=celpy.InterpretedRunner(_ENV, tree))
    return Condition(source=source, runner=_ENV.program(tree))


def _calls_has(tree: lark.Tree[lark.Token]) -> bool:
    return any(node.data == "ident_arg" and _first_token(node) == "has" for node in _walk(tree))
