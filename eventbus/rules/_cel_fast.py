"""A fast path for the common shapes of CEL condition, in front of cel-python.

cel-python spends 90-170 µs on `event.data.total > 10 && event.data.unit == "C"` (most of it
resolving names and wrapping values in its own types), and the event must first be converted
to those types. Most conditions are field reads, comparisons with literals, `&&`, `||`, `!`,
`?:`, `in`, `+ - *` on numbers, `size()`, `has()` and the string tests `startsWith`, `endsWith`,
`contains`: this module compiles such a condition, once, to Python closures over the plain
JSON event, which answer it in a few microseconds.

It never decides anything cel-python would decide differently: each step checks that its
operands are of the exact JSON types for which cel-python's result is Python's own (two ints
within int64, two doubles, two strings, a field present in a map ...) and otherwise raises
``Unsure``, and the caller then asks cel-python, which gives the verdict and, for errors, the
reason. ``Contained`` marks the error values that ``&&``, ``||`` and ``?:`` may absorb, as
cel-python does; one that reaches the top is the verdict, an error, with the fast path's own
reason (the first error's, as ``_cel._logic`` gives on cel-python). So mixed types and
everything else unusual cost what they cost before, and the common case is quick. A condition
with anything outside this subset (``/``, ``%``, macros, other functions, map literals, nested
lists, uint or bytes) compiles to ``None`` and runs on cel-python alone.
tests/rules/test_cel_fast.py compares the two on generated conditions and events.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any, cast

import lark
from celpy import celtypes
from celpy.evaluation import celstr

__all__ = ["SPANNING", "Contained", "FastCondition", "Unsure", "compile_fast"]

FastCondition = Callable[[dict[str, Any]], Any]


class Unsure(Exception):
    """The fast path cannot vouch for cel-python's answer: ask cel-python, which may even fail
    the whole evaluation here (it does for a field of a list, say)."""


class Contained(Unsure):
    """cel-python has an error value here, never an exception: an ``&&``, ``||`` or ``?:``
    that the other side decides absorbs it. Raised out of the whole condition, it is the
    verdict: an error, for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Refused(Exception):
    """The condition uses something outside the fast path's subset."""


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_ORDERED = (int, float, str)  # what < <= > >= take: two of the same type
_SCALARS = (int, float, str, bool, type(None))  # what == != and `in` take, likewise
_ORDER = {
    "relation_lt": operator.lt,
    "relation_le": operator.le,
    "relation_gt": operator.gt,
    "relation_ge": operator.ge,
}
_ARITHMETIC = {
    "addition_add": operator.add,
    "addition_sub": operator.sub,
    "multiplication_mul": operator.mul,
}
_STRING_TESTS = {
    "startsWith": str.startswith,
    "endsWith": str.endswith,
    "contains": str.__contains__,
}
# Grammar nodes that span a whole sub-expression (operator nodes such as `addition_add` span
# only the left operand and the operator); with one child, they only wrap it.
SPANNING = frozenset(
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
_WRAPPERS = SPANNING | {"primary", "paren_expr"}


def compile_fast(tree: lark.Tree[lark.Token], *, interpreted: bool) -> FastCondition | None:
    """The fast path for a parsed condition, or ``None`` if it uses anything outside the subset.

    ``interpreted`` says which of cel-python's runners the condition runs on otherwise (they
    fail outright in different places). Calling the result returns the condition's value for a
    plain JSON event or raises ``Unsure``."""
    try:
        return _Compiler(interpreted).node(tree)
    except (_Refused, RecursionError):
        return None


# Grammar nodes between the root and the deepest leaf. A condition ten clauses long is about
# 30 deep; cel-python runs out of stack somewhere past 500, and its answer (an error) stands.
_MAX_DEPTH = 200


def _unwrap(node: lark.Tree[lark.Token]) -> tuple[lark.Tree[lark.Token], int]:
    """``node`` without the wrapper nodes around its one child, and how many there were."""
    levels = 0
    while node.data in _WRAPPERS and len(node.children) == 1:
        (child,) = node.children
        if not isinstance(child, lark.Tree):
            break
        node, levels = child, levels + 1
    return node, levels


def _unwrapped(node: lark.Tree[lark.Token]) -> lark.Tree[lark.Token]:
    return _unwrap(node)[0]


def _plain_int(value: int) -> bool:
    # cel-python sees an integer outside int64 as a double (eventbus's conversion).
    return _INT64_MIN <= value <= _INT64_MAX


def _same_scalar(a: Any, b: Any, kinds: tuple[type, ...]) -> None:
    # Values of different types: cel-python answers some with an error, others with a value
    # (`true == 1` is true, `1.5 < 1` false), as it does an integer beyond int64 (a double).
    kind = type(a)
    if kind is not type(b) or kind not in kinds:
        raise Unsure
    if kind is int and not (_plain_int(a) and _plain_int(b)):
        raise Unsure


# the reasons cel-python gives for the error values the fast path finds
_OVERFLOW = "return error for overflow: overflow"


def _value(part: FastCondition, event: dict[str, Any]) -> Any:
    """``part(event)``, or the ``Contained`` it raised where cel-python has an error value
    (``Unsure`` still propagates)."""
    try:
        return part(event)
    except Contained as error:
        return error


def _pair(
    first: FastCondition, second: FastCondition, event: dict[str, Any], *, unsure: bool = False
) -> tuple[Any, Any]:
    """Both operands; the second is evaluated even when the first is contained, because
    cel-python may fail outright on it. With ``unsure``, a contained first operand is left to
    cel-python (``Unsure``): its reason is one the fast path does not write."""
    a, b = _value(first, event), _value(second, event)
    if type(a) is Contained:
        if unsure:
            raise Unsure
        raise Contained(a.reason)
    if type(b) is Contained:
        raise Contained(b.reason)
    return a, b


class _Compiler:
    def __init__(self, interpreted: bool) -> None:
        self._interpreted = interpreted
        self._depth = 0

    def _target(self, receiver: FastCondition) -> FastCondition:
        """``receiver`` as the target of a field read. The compiled runner fails outright on an
        error value there (it calls a method of the error object); the interpreter yields an
        error value. (A string method's receiver: ``_string_test``.)"""
        if self._interpreted:
            return receiver

        def target(event: dict[str, Any]) -> Any:
            try:
                return receiver(event)
            except Contained:
                raise Unsure from None

        return target

    def node(self, tree: lark.Tree[lark.Token]) -> FastCondition:
        tree, depth = _unwrap(tree)
        build = getattr(self, f"_{tree.data}", None)
        if build is None:
            raise _Refused(tree.data)
        self._depth += depth + 1
        try:
            if self._depth > _MAX_DEPTH:
                raise _Refused("depth")
            result: FastCondition = build(*tree.children)
        finally:
            self._depth -= depth + 1
        return result

    # -- logic. CEL's && || ?: absorb an error on the side the other decides, and so does
    # cel-python, but only for error values: every operand is evaluated, and one that might
    # fail cel-python outright (Unsure) leaves the whole condition to cel-python.

    def _expr(self, *parts: Any) -> FastCondition:
        if len(parts) != 3:
            raise _Refused("expr")
        test, then, otherwise = (self.node(part) for part in parts)

        def choose(event: dict[str, Any]) -> Any:
            chosen = _value(test, event)
            yes, no = _value(then, event), _value(otherwise, event)
            if chosen is True:
                value = yes
            elif chosen is False:
                value = no
            else:
                raise Unsure
            if type(value) is Contained:
                raise Contained(value.reason)
            return value

        return choose

    def _conditionalor(self, left: Any, right: Any) -> FastCondition:
        return _logic(self.node(left), self.node(right), True)

    def _conditionaland(self, left: Any, right: Any) -> FastCondition:
        return _logic(self.node(left), self.node(right), False)

    def _unary(self, op: Any, operand: Any) -> FastCondition:
        inner = self.node(operand)
        if op.data == "unary_neg":
            return _negated(inner)
        if op.data != "unary_not":
            raise _Refused(op.data)

        def negated(event: dict[str, Any]) -> Any:
            value = inner(event)
            if value is True:
                return False
            if value is False:
                return True
            raise Unsure  # `!` of a non-bool

        return negated

    # -- arithmetic: + - * on two ints (int64, as cel-python checks) or two doubles; cel-python
    # also adds a bool to an int, multiplies a double by an int and concatenates strings, which
    # is left to it (Unsure), as are / and %

    def _addition(self, op: Any, right: Any) -> FastCondition:
        if op.data not in _ARITHMETIC:
            raise _Refused(op.data)
        (left,) = op.children
        return _arithmetic(_ARITHMETIC[op.data], self.node(left), self.node(right))

    def _multiplication(self, op: Any, right: Any) -> FastCondition:
        return self._addition(op, right)

    # -- relations

    def _relation(self, op: Any, right: Any) -> FastCondition:
        kind = op.data
        (left,) = op.children
        first, second = self.node(left), self.node(right)
        if kind in _ORDER:
            compare = _ORDER[kind]

            def ordered(event: dict[str, Any]) -> Any:
                a, b = _pair(first, second, event)
                _same_scalar(a, b, _ORDERED)
                return compare(a, b)

            return ordered
        if kind in ("relation_eq", "relation_ne"):
            want = kind == "relation_eq"

            def equal(event: dict[str, Any]) -> Any:
                a, b = _pair(first, second, event)
                _same_scalar(a, b, _SCALARS)
                return (a == b) is want

            return equal
        if kind == "relation_in":
            return self._in(first, second)
        raise _Refused(kind)

    @staticmethod
    def _in(first: FastCondition, second: FastCondition) -> FastCondition:
        def member_of(event: dict[str, Any]) -> Any:
            item, container = _pair(first, second, event)
            kind = type(container)
            if kind is dict:
                if type(item) is not str:
                    raise Unsure
                return item in container
            if kind is not list and kind is not tuple:
                raise Unsure
            # Every element of the item's type: cel-python compares each, and one of another
            # type makes the answer an error unless the item is found first.
            for element in container:
                _same_scalar(item, element, _SCALARS)
            return item in container

        return member_of

    # -- reading the event

    def _ident(self, name: lark.Token) -> FastCondition:
        if str(name) != "event":
            raise _Refused(str(name))  # a macro's variable or a type name
        return _identity

    def _member_dot(self, parent: Any, name: lark.Token) -> FastCondition:
        container, key = self._target(self.node(parent)), str(name)
        # each runner's own words
        missing = f"no such member in mapping: {key!r}"
        if not self._interpreted:
            missing += f": {key}"

        def field(event: dict[str, Any]) -> Any:
            value = container(event)
            if type(value) is not dict:
                raise Unsure  # cel-python fails outright on a field of a list, say
            try:
                return value[key]
            except KeyError:
                raise Contained(missing) from None

        return field

    def _member_index(self, parent: Any, index: Any) -> FastCondition:
        container, key = self.node(parent), self.node(index)
        interpreted = self._interpreted

        def item(event: dict[str, Any]) -> Any:
            # the interpreter names the index's type when it indexes an error value
            # ("CELEvalError[int]")
            value, at = _pair(container, key, event, unsure=interpreted)
            kind = type(value)
            if kind is dict and type(at) is str:
                if at in value:
                    return value[at]
                raise Contained(
                    f"no such key: {at}"  # each runner's own words
                    if interpreted
                    else f"no such member in mapping: StringType({at!r}): {at}"
                )
            if kind is list and type(at) is int and 0 <= at < len(value):
                return value[at]
            raise Unsure  # cel-python reads `list[-1]` as Python does

        return item

    def _member_dot_arg(self, target: Any, name: lark.Token, *args: Any) -> FastCondition:
        method = str(name)
        if method == "size" and not args:
            return self._size(target)
        receiver = self.node(target)
        arguments = self._arguments(args)
        if method in _STRING_TESTS and len(arguments) == 1:
            return _string_test(_STRING_TESTS[method], receiver, arguments[0])
        raise _Refused(method)

    def _ident_arg(self, name: lark.Token, *args: Any) -> FastCondition:
        function = str(name)
        if function == "size" and len(args) == 1 and len(args[0].children) == 1:
            return self._size(args[0].children[0])
        if function == "has" and len(args) == 1:
            return self._has(args[0])
        raise _Refused(function)

    def _has(self, exprlist: Any) -> FastCondition:
        if len(exprlist.children) != 1:
            raise _Refused("has")
        node = _unwrapped(exprlist.children[0])
        if node.data != "member_dot":
            raise _Refused("has")
        parent: Any
        parent, name = node.children
        container, key = self.node(parent), str(name)

        def present(event: dict[str, Any]) -> Any:
            try:
                value = container(event)
            except Contained:
                raise Unsure from None  # has() of a field of a missing field: cel-python's call
            if type(value) is not dict:
                raise Unsure
            return key in value

        return present

    def _size(self, of: Any) -> FastCondition:
        """``size()`` of ``of``; refused for a `&&`, `||` or `?:`: of their error values
        cel-python's size() answers in words of its own (`(a && a).size()` of a missing `a`
        is "no such overload: ... 'CELEvalError' has no len()", where the fast path said the
        field's error). The size of a bool is no condition anyone means."""
        inner = _unwrapped(of)
        if inner.data in ("expr", "conditionalor", "conditionaland") and len(inner.children) > 1:
            raise _Refused(inner.data)
        return _sized(self.node(of))

    def _arguments(self, args: tuple[Any, ...]) -> list[FastCondition]:
        if not args:
            return []
        (exprlist,) = args
        return [self.node(child) for child in exprlist.children]

    # -- literals, read by cel-python

    def _literal(self, token: lark.Token) -> FastCondition:
        value = self._constant(token)
        return lambda event: value

    def _list_lit(self, *args: Any) -> FastCondition:
        items: list[Any] = []
        for expr in args[0].children if args else ():
            node = _unwrapped(expr)
            if node.data != "literal":
                raise _Refused("list_lit")  # a nested list, a field ...
            token: Any = node.children[0]
            items.append(self._constant(token))
        value = tuple(items)
        return lambda event: value

    @staticmethod
    def _constant(token: lark.Token) -> Any:
        # As cel-python reads them (its interpreter's conversions; the compiled runner writes
        # the same numbers as Python literals), without parsing each literal again.
        kind, text = token.type, str(token)
        if kind == "BOOL_LIT":
            return text == "true"
        if kind == "NULL_LIT":
            return None
        if kind == "INT_LIT" and (digits := _DECIMAL_OR_HEX.fullmatch(text)):
            # celtypes.IntType's reading (hexadecimal after 0x, a sign before it), int64 only
            value = int(digits[2], 16) if digits[2] else int(digits[3])
            value = -value if digits[1] else value
            if not _plain_int(value):
                raise _Refused(kind)  # cel-python reports it at run time
            return value
        try:
            if kind == "FLOAT_LIT":
                return float(celtypes.DoubleType(text))
            if kind in ("STRING_LIT", "MLSTRING_LIT"):
                return str(celstr(token))
        except (ValueError, TypeError) as exc:
            raise _Refused(kind) from exc
        raise _Refused(kind)  # uint and bytes have no JSON counterpart


_DECIMAL_OR_HEX = re.compile(r"(-?)(?:0[xX]([0-9a-fA-F]+)|(0|[1-9][0-9]*))")


def _identity(event: dict[str, Any]) -> Any:
    return event


def _logic(first: FastCondition, second: FastCondition, decides: bool) -> FastCondition:
    """``||`` (``decides`` True) or ``&&`` (False): a side equal to ``decides`` is the answer,
    whatever the other is, unless that other might fail cel-python outright."""

    def combined(event: dict[str, Any]) -> Any:
        a, b = _value(first, event), _value(second, event)
        if a is decides or b is decides:
            return decides
        if type(a) is bool and type(b) is bool:
            return not decides
        if (type(a) is Contained or type(a) is bool) and (type(b) is Contained or type(b) is bool):
            # cel-python has an error value; the first says why (``_cel._logic``)
            error = a if type(a) is Contained else b
            raise Contained(cast(Contained, error).reason)
        raise Unsure  # a value that is not a bool

    return combined


def _arithmetic(
    compute: Callable[[Any, Any], Any], first: FastCondition, second: FastCondition
) -> FastCondition:
    def result(event: dict[str, Any]) -> Any:
        a, b = _pair(first, second, event)
        kind = type(a)
        if kind is not type(b):
            raise Unsure
        if kind is int:
            if not (_plain_int(a) and _plain_int(b)):
                raise Unsure
            value = compute(a, b)
            if not _plain_int(value):
                raise Contained(_OVERFLOW)
            return value
        if kind is float:
            return compute(a, b)
        # Two strings concatenate to a plain str on cel-python, not its StringType: a later
        # .contains() on it fails the compiled runner outright. Left to cel-python.
        raise Unsure

    return result


def _negated(operand: FastCondition) -> FastCondition:
    def result(event: dict[str, Any]) -> Any:
        value = operand(event)
        kind = type(value)
        if kind is int and _plain_int(value):
            if not _plain_int(-value):
                raise Contained(_OVERFLOW)  # -(-2**63)
            return -value
        if kind is float:
            return -value
        raise Unsure

    return result


def _sized(receiver: FastCondition) -> FastCondition:
    def size(event: dict[str, Any]) -> Any:
        value = receiver(event)
        kind = type(value)
        if kind is list or kind is str or kind is dict:
            return len(value)
        raise Unsure  # size(null) is 0 on cel-python

    return size


def _string_test(
    test: Callable[[str, str], bool], receiver: FastCondition, argument: FastCondition
) -> FastCondition:
    def tested(event: dict[str, Any]) -> Any:
        text, part = _value(receiver, event), _value(argument, event)
        if type(text) is not str:
            # cel-python's compiled runner calls the method on the receiver, and fails outright
            # when it has none (a bool, an error value), whatever the argument is
            raise Unsure
        if type(part) is Contained:
            raise Contained(part.reason)
        if type(part) is not str:
            raise Unsure
        return test(text, part)

    return tested
