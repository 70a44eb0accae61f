"""The parser of one pattern leaf: the array of alternatives under a field name, with every
operator validated, turned into a ``Leaf`` of matchers (``_pattern_ops``).

Rule engine, step one: ``_pattern`` walks a pattern object and calls ``parse_leaf`` for each
leaf; every malformed operator is a ``PatternError`` naming the field.
"""

from __future__ import annotations

import ipaddress
import math

from eventbus._errors import PatternError
from eventbus.rules._pattern_ops import (
    AnythingBut,
    Cidr,
    EqualsIgnoreCase,
    Exact,
    Exists,
    Leaf,
    Matcher,
    Numeric,
    Prefix,
    Scalar,
    Suffix,
    Wildcard,
    is_number,
)

__all__ = ["parse_leaf"]

_NUMERIC_OPS = {"=", "<", "<=", ">", ">="}


def parse_leaf(spec: object, path: tuple[str, ...], where: str) -> Leaf:
    """Parse the leaf array ``spec`` found at field ``path``.

    ``where`` is the dotted location used in error messages. Raises ``PatternError`` when
    ``spec`` is not a non-empty array or any alternative is malformed.
    """
    if not isinstance(spec, list):
        raise PatternError(
            f"a field's value must be an array of alternatives or an object, got {_kind(spec)}",
            path=where,
        )
    if not spec:
        raise PatternError("empty array of alternatives matches nothing", path=where)
    # in order, each once: a dict, not a list searched per alternative (20,000 took 31 s)
    matchers: dict[Matcher, None] = {}
    absent_ok = False
    for item in spec:
        if isinstance(item, dict):
            op = _parse_operator(item, where)
            if op is None:
                absent_ok = True
            else:
                matchers[op] = None
        else:
            matchers[Exact.of(_scalar(item, where, "an alternative"))] = None
    return Leaf(path, tuple(matchers), absent_ok)


def _parse_operator(item: dict[str, object], where: str) -> Matcher | None:
    """One ``{"operator": operand}`` object; ``None`` stands for ``{"exists": false}``."""
    if len(item) != 1:
        raise PatternError(
            f"an operator object must have exactly one key, got {sorted(item)!r}", path=where
        )
    ((name, operand),) = item.items()
    if name == "prefix":
        return Prefix(*_string_or_ignore_case(operand, where, "prefix"))
    if name == "suffix":
        return Suffix(*_string_or_ignore_case(operand, where, "suffix"))
    if name == "equals-ignore-case":
        return EqualsIgnoreCase(_string(operand, where, name).casefold())
    if name == "wildcard":
        return _wildcard(_string(operand, where, name), where)
    if name == "numeric":
        return _numeric(operand, where)
    if name == "cidr":
        return _cidr(operand, where)
    if name == "exists":
        if type(operand) is not bool:
            raise PatternError(f"exists takes true or false, got {_kind(operand)}", path=where)
        return Exists() if operand else None
    if name == "anything-but":
        return _anything_but(operand, where)
    raise PatternError(f"unknown operator {name!r}", path=where)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _scalar(value: object, where: str, what: str) -> Scalar:
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise PatternError(f"{what} must be a finite number, got {value!r}", path=where)
        return value
    raise PatternError(
        f"{what} must be a string, number, boolean or null, got {_kind(value)}", path=where
    )


def _string(value: object, where: str, op: str) -> str:
    if not isinstance(value, str):
        raise PatternError(f"{op} takes a string, got {_kind(value)}", path=where)
    return value


def _string_or_ignore_case(value: object, where: str, op: str) -> tuple[str, bool]:
    """``"x"`` or ``{"equals-ignore-case": "x"}`` as the operand of prefix/suffix."""
    if isinstance(value, dict):
        if list(value) != ["equals-ignore-case"]:
            raise PatternError(
                f'{op} takes a string or {{"equals-ignore-case": string}}, '
                f"got keys {sorted(value)!r}",
                path=where,
            )
        return _string(
            value["equals-ignore-case"], where, f"{op} equals-ignore-case"
        ).casefold(), True
    return _string(value, where, op), False


def _wildcard(text: str, where: str) -> Wildcard:
    """Compile a wildcard: ``*`` is any run, ``\\*`` a literal star, ``\\\\`` a backslash."""
    pieces: list[str] = []
    literal: list[str] = []
    previous_star = False
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 == len(text) or text[i + 1] not in "*\\":
                raise PatternError(
                    f"wildcard {text!r}: a backslash may only escape '*' or '\\'", path=where
                )
            literal.append(text[i + 1])
            previous_star = False
            i += 2
            continue
        if char == "*":
            if previous_star:
                raise PatternError(
                    f"wildcard {text!r}: consecutive '*' characters are not allowed", path=where
                )
            pieces.append("".join(literal))
            literal = []
            previous_star = True
        else:
            literal.append(char)
            previous_star = False
        i += 1
    pieces.append("".join(literal))
    return Wildcard(text, tuple(pieces))


def _numeric(operand: object, where: str) -> Numeric:
    """``[op, n]`` or ``[lower-op, n, upper-op, m]`` with a non-empty range."""
    if not isinstance(operand, list) or len(operand) not in (2, 4):
        raise PatternError("numeric takes [op, number] or [op, number, op, number]", path=where)
    low: int | float | None = None
    high: int | float | None = None
    low_open = high_open = False
    for i in range(0, len(operand), 2):
        op, number = operand[i], operand[i + 1]
        if not isinstance(op, str) or op not in _NUMERIC_OPS:
            raise PatternError(
                f"numeric: unknown comparison {op!r} (use =, <, <=, >, >=)", path=where
            )
        if not is_number(number) or (isinstance(number, float) and not math.isfinite(number)):
            raise PatternError(
                f"numeric: {op!r} needs a finite number, got {_kind(number)}", path=where
            )
        assert isinstance(number, int | float)
        if op == "=":
            if len(operand) != 2:
                raise PatternError("numeric: '=' cannot be part of a range", path=where)
            return Numeric(number, False, number, False)
        if op in (">", ">="):
            if low is not None:
                raise PatternError("numeric: two lower bounds in one range", path=where)
            low, low_open = number, op == ">"
        else:
            if high is not None:
                raise PatternError("numeric: two upper bounds in one range", path=where)
            high, high_open = number, op == "<"
    if low is not None and high is not None and low >= high:
        raise PatternError(
            f"numeric: lower bound {low!r} must be below upper bound {high!r}", path=where
        )
    return Numeric(low, low_open, high, high_open)


def _cidr(operand: object, where: str) -> Cidr:
    text = _string(operand, where, "cidr")
    _, slash, length = text.partition("/")
    try:
        if slash and not length.isdigit():
            # a netmask ("/255.0.0.0") or host mask: the stdlib reads them, CIDR is a length
            raise ValueError(f"prefix length {length!r} is not a number")
        # Host bits set ("10.0.0.7/24") are accepted and masked: the block the address is in
        # (event-ruler ranges from the address to the block's end; docs/patterns.md).
        return Cidr(ipaddress.ip_network(text, strict=False))
    except ValueError as exc:
        raise PatternError(f"cidr: {text!r} is not an IPv4 or IPv6 CIDR block", path=where) from exc


_ANYTHING_BUT_INNER = ("prefix", "suffix", "equals-ignore-case", "wildcard")


def _anything_but(operand: object, where: str) -> AnythingBut:
    """A string, a number, a list of only strings or only numbers, or one string operator."""
    if isinstance(operand, dict):
        if len(operand) != 1 or next(iter(operand)) not in _ANYTHING_BUT_INNER:
            raise PatternError(
                "anything-but takes a value, a list, or one of "
                f"{', '.join(_ANYTHING_BUT_INNER)}; got keys {sorted(operand)!r}",
                path=where,
            )
        ((name, texts),) = operand.items()
        strings = texts if isinstance(texts, list) else [texts]
        if not strings:
            raise PatternError(f"anything-but {name}: empty list", path=where)
        inner: list[Prefix | Suffix | EqualsIgnoreCase | Wildcard] = []
        for text in strings:
            value = _string(text, where, f"anything-but {name}")
            if not value and name in ("prefix", "suffix"):
                # every string starts and ends with "": no string would match (EventBridge's
                # matcher refuses it too)
                raise PatternError(
                    f"anything-but {name}: empty, it excludes every string", path=where
                )
            if name == "wildcard" and value == "*":  # ("**" is refused as any wildcard)
                raise PatternError(
                    f"anything-but wildcard {value!r} excludes every string", path=where
                )
            if name == "prefix":
                inner.append(Prefix(value, False))
            elif name == "suffix":
                inner.append(Suffix(value, False))
            elif name == "equals-ignore-case":
                inner.append(EqualsIgnoreCase(value.casefold()))
            else:
                inner.append(_wildcard(value, where))
        return AnythingBut(frozenset(), frozenset(), tuple(inner))
    values = operand if isinstance(operand, list) else [operand]
    if not values:
        raise PatternError("anything-but: empty list", path=where)
    if all(isinstance(v, str) for v in values):
        return AnythingBut(frozenset(values), frozenset(), ())  # type: ignore[arg-type]
    if all(is_number(v) for v in values):
        numbers = frozenset(_scalar(v, where, "anything-but") for v in values)
        return AnythingBut(frozenset(), numbers, ())  # type: ignore[arg-type]
    raise PatternError(
        "anything-but takes strings or numbers (a list must hold only one of the two)",
        path=where,
    )
