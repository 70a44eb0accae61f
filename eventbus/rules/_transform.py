"""Transforms: what a target receives once a rule matched (EventBridge input transformers).

The last step of routing: ``RuleSet.route`` applies a rule's (or a target's) ``Transform`` to
the matched event and puts the result in the ``Route``. Everything is parsed at rule load
(JSONPath parsing costs ~0.4 ms, a lookup ~6 µs).

A transform is either a ``constant`` or ``input_paths`` (named JSONPath expressions over the
whole CloudEvent) filled into a ``template``:

* a template that is a mapping or list is a JSON template: a string value that is exactly one
  placeholder (``"<key>"``) becomes the variable's JSON value with its type (string, number,
  object...; ``null`` when the path finds nothing); placeholders inside a longer string are
  interpolated as text. JSON quoting is therefore never the user's concern;
* a template that is a string is a string template: the result is that text;
* as text, a string variable is inserted as is and any other value as compact JSON.

A variable whose path can select several values (``[*]``, ``..``, filters, slices, unions)
is always a list; any other path gives one value or ``null``. With ``keep_cloudevent: true``
the result replaces only ``data`` and the attributes stay, so the target still gets a CloudEvent.

Bounded: a path may descend recursively (``..``) once; a transform with a path that selects
several values (or a template placing values more than 4 times) gives at most ``MAX_SELECTED``
values and ``MAX_OUTPUT_BYTES`` of output, or
raises :class:`TransformTooLarge` (``$..*`` gave 64 times a deep event, 16 MB of 256 KiB).
"""

from __future__ import annotations

import functools
import math
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, cast

import orjson
from jsonpath_ng import JSONPath
from jsonpath_ng import jsonpath as jp
from jsonpath_ng.exceptions import JSONPathError
from jsonpath_ng.ext.arithmetic import Operation
from jsonpath_ng.ext.filter import Expression, Filter
from jsonpath_ng.ext.parser import ExtendedJsonPathParser
from jsonpath_ng.ext.string import Sub
from jsonpath_ng.jsonpath import DatumInContext
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_OUTPUT_BYTES",
    "MAX_SELECTED",
    "Transform",
    "TransformSpec",
    "TransformTooLarge",
    "Variable",
]

MAX_SELECTED = 10_000
"""Values one path may select in one event."""
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
"""JSON bytes the output of a transform with a multi-valued path (or a template placing values
more than ``_UNMEASURED_USES`` times) may take."""
# Uses of variables in a template up to which its output is not measured: it stays within a few
# times the event. More (400 uses of ``$`` made 80 MB of a 200 KB event) are measured as a
# multi-valued path's output is.
_UNMEASURED_USES = 4


MAX_TRANSFORM_SECONDS = 0.25
"""The time a transform's input paths may take on one event (as a condition's budget)."""


class TransformTooLarge(Exception):
    """A transform's output for this event is over its bound (``MAX_SELECTED``,
    ``MAX_OUTPUT_BYTES``), or holds a value JSON cannot write (an integer beyond 64 bits)."""


_PLACEHOLDER = re.compile(r"<([A-Za-z_][A-Za-z0-9_.-]*)>")
_VARIABLE_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"

Render = Callable[[dict[str, Any]], Any]

MAX_TEMPLATE_DEPTH = 64
"""Levels a template or constant may nest. The values filled in nest up to 64 more (an event's
``data`` may, and ``$`` is the whole event); the JSON serializer stops at 254 levels, and a
deeper template loaded fine and then failed every delivery (and its dead letter)."""


@functools.cache
def _parser() -> ExtendedJsonPathParser:
    # Building the parser tables costs ~15 ms: do it once, on the first rule that needs it.
    return ExtendedJsonPathParser()


def _definite(path: JSONPath) -> bool:
    if isinstance(path, jp.Child):
        return _definite(path.left) and _definite(path.right)
    if isinstance(path, jp.Fields):
        return len(path.fields) == 1 and path.fields[0] != "*"
    if isinstance(path, jp.Index):
        return len(path.indices) == 1
    return isinstance(path, jp.Root | jp.This)


@dataclass(frozen=True)
class Variable:
    """One named JSONPath expression, parsed once."""

    name: str
    path: JSONPath
    many: bool
    filters: bool = False
    """Whether the path has a filter (``[?(...)]``): jsonpath-ng's filter applied to an object
    replaces the object, in the document it searches, by the list of its values. Such a path
    searches a copy: the event itself was changed, for every other rule and target."""

    def value(self, event: dict[str, Any]) -> Any:
        """The selected value (or list of values when ``many``); ``None`` when nothing matches."""
        try:
            found = [
                match.value for match in self.path.find(_copy(event) if self.filters else event)
            ]
        except Exception:
            # jsonpath-ng filters coerce with int() and raise on a null or object value: a path
            # that cannot be followed in this event selects nothing, like a missing field.
            found = []
        if self.many:
            if len(found) > MAX_SELECTED:
                raise TransformTooLarge(
                    f"input path {self.name!r} selects {len(found)} values, "
                    f"more than {MAX_SELECTED}"
                )
            return found
        return found[0] if found else None


def _copy(value: Any) -> Any:
    """``value`` with every object and array copied (the scalars they hold are immutable); an
    event nests at most ``MAX_STORED_DEPTH`` levels, well within Python's recursion."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _parse_path(source: object) -> JSONPath:
    if not isinstance(source, str):
        raise PydanticCustomError("jsonpath", "a JSONPath must be a string")
    if not source.startswith("$"):
        raise PydanticCustomError(
            "jsonpath", "JSONPath '{source}' must start at the event root '$'", {"source": source}
        )
    try:
        path = _parser().parse(source)
    except (JSONPathError, ValueError, TypeError, AttributeError) as exc:
        # jsonpath-ng's parser reports some malformed input as plain Python errors.
        raise PydanticCustomError(
            "jsonpath", "invalid JSONPath '{source}': {reason}", {"source": source, "reason": exc}
        ) from exc
    refused = _unsupported(path)
    if refused is None and _count(path, jp.Root) > 1:
        # $.data.$ selected the whole event again
        refused = "'$' past the start of the path"
    if refused is None and _count(path, jp.Descendants) > 1:
        # each more multiplies what is selected: $..*..*..*..* made 683 MB of a 1.4 KB event,
        # $..k[?(@..x)] took 5 s of the router's loop
        refused = "more than one recursive descent (..)"
    # jsonpath-ng reads a filter's null as the string "null": `[?(@.qty == null)]` selected
    # the items whose qty was the text "null", not null. Written unquoted, it is JSON's null;
    # quoted too in one path, which is which cannot be told apart after parsing.
    nulls = _UNQUOTED_NULL.search(source) is not None
    if refused is None and nulls and _QUOTED_NULL.search(source):
        refused = "null and the string 'null' in one path"
    if refused is not None:
        raise PydanticCustomError(
            "jsonpath",
            "JSONPath '{source}': {what} is not supported",
            {"source": source, "what": refused},
        )
    _compare_as_json(path, nulls)
    return path


_UNQUOTED_NULL = re.compile(r"""[=!<>]\s*null(?![\w'"])""")  # compared with, not a field
_QUOTED_NULL = re.compile(r"""['"]null['"]""")


_ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _json_compare(value: Any, op: str, literal: Any) -> bool:
    """``value op literal`` as JSON values compare: numbers with numbers (a bool is none),
    strings with strings; values of different types are unequal and unordered."""

    def kind(v: Any) -> str:
        if isinstance(v, bool):
            return "bool"
        return "number" if isinstance(v, int | float) else type(v).__name__

    same = kind(value) == kind(literal)
    if op in ("==", "="):
        return same and value == literal
    if op == "!=":
        return not (same and value == literal)
    return same and kind(value) in ("number", "str") and _ORDER[op](value, literal)


# jsonpath-ng 1.8 ships no types (subclassing Any); 1.17 does: the ignore is for the older ones
class _JsonExpression(Expression):  # type: ignore[misc,unused-ignore]
    """A filter's comparison on JSON values: jsonpath-ng's turns the event's value into an int
    whenever the literal is one (2.9 == 2, "2" == 2 and true == 1 all held), and one element it
    cannot compare (null > 1) raised and emptied the whole selection."""

    def find(self, datum: Any) -> list[Any]:
        found = self.target.find(DatumInContext.wrap(datum))
        if not found or self.op is None:
            return cast("list[Any]", found)
        return [d for d in found if _json_compare(d.value, self.op, self.value)]


def _compare_as_json(node: Any, nulls: bool = False) -> None:
    """Give every filter of the parsed ``node`` JSON comparisons (``_JsonExpression``); with
    ``nulls`` (the path wrote ``null`` unquoted), a literal "null" is JSON's null."""
    if isinstance(node, Filter):
        node.expressions = [
            _JsonExpression(e.target, e.op, None if nulls and e.value == "null" else e.value)
            if type(e) is Expression
            else e
            for e in node.expressions
        ]
    for child in _children(node):
        _compare_as_json(child, nulls)


def _unsupported(node: Any) -> str | None:
    """What ``node`` uses of jsonpath-ng's extensions beyond the documented filters: its
    regular expressions (`sub()`, ``=~``) run Python's backtracking ``re`` on event text (a
    nested quantifier took seconds on 25 characters), and its arithmetic repeats a string by
    an event's number (gigabytes)."""
    if isinstance(node, Sub):
        return "sub() (a regular expression)"
    if isinstance(node, Operation):
        return "arithmetic"
    if isinstance(node, Expression) and node.op == "=~":
        return "=~ (a regular expression)"
    for child in _children(node):
        found = _unsupported(child)
        if found is not None:
            return found
    return None


def _children(node: Any) -> list[Any]:
    """The parts of a parsed path, a filter's expressions included."""
    children = [getattr(node, name, None) for name in ("left", "right", "target")]
    children += getattr(node, "expressions", None) or []
    return [child for child in children if child is not None]


def _count(node: Any, kind: type) -> int:
    """Nodes of ``kind`` anywhere in a parsed path, its filters' included."""
    own = 1 if isinstance(node, kind) else 0
    return own + sum(_count(child, kind) for child in _children(node))


def _unfit(value: Any, limit: int) -> str | None:
    """Why ``value`` cannot be a template or constant: objects and arrays nested more than
    ``limit`` levels (walked without recursion: a constant of 3,000 levels from Python raised
    RecursionError out of the load), or a number JSON cannot write (YAML's 1e400 or .inf went
    out as null)."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            if level >= limit:
                return f"nests objects and arrays more than {limit} levels deep"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
        elif isinstance(item, float) and not math.isfinite(item):
            return f"holds {item}, which JSON cannot write"
        elif type(item) is int and not _JSON_INT_MIN <= item <= _JSON_INT_MAX:
            return f"holds {item}, an integer beyond 64 bits, which JSON cannot write"
    return None


_JSON_INT_MIN, _JSON_INT_MAX = -(2**63), 2**64 - 1  # what orjson writes


def _size(output: Any) -> int:
    """The bytes ``output`` takes as UTF-8 text or JSON."""
    return len(output.encode() if isinstance(output, str) else _json(output))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _json(value).decode()


def _json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        # An integer beyond 64 bits (an event handed to ``RuleSet.route`` directly; ingestion
        # refuses them): a failed transform, not an exception out of routing.
        raise TransformTooLarge(f"a selected value cannot be written as JSON: {exc}") from None


def _uses(template: Any) -> list[str]:
    """The variables ``template`` places, a name for each use."""
    if isinstance(template, dict):
        return [name for value in template.values() for name in _uses(value)]
    if isinstance(template, list):
        return [name for item in template for name in _uses(item)]
    return _PLACEHOLDER.findall(template) if isinstance(template, str) else []


def _compile_template(template: Any) -> Render:
    if isinstance(template, dict):
        items = [(key, _compile_template(value)) for key, value in template.items()]
        return lambda values: {key: render(values) for key, render in items}
    if isinstance(template, list):
        renders = [_compile_template(item) for item in template]
        return lambda values: [render(values) for render in renders]
    if not isinstance(template, str):
        return lambda values: template
    # split() alternates literal text (even indexes) and variable names (odd indexes).
    parts = _PLACEHOLDER.split(template)
    if len(parts) == 1:
        return lambda values: template
    if len(parts) == 3 and parts[0] == parts[2] == "":
        name = parts[1]
        return lambda values: values[name]
    return lambda values: "".join(
        _text(values[part]) if odd else part for odd, part in _alternating(parts)
    )


def _alternating(parts: list[str]) -> list[tuple[bool, str]]:
    return [(index % 2 == 1, part) for index, part in enumerate(parts) if part]


class TransformSpec(BaseModel):
    """A transform as written in a rule (validated edge form; see the module docstring)."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, arbitrary_types_allowed=True
    )

    input_paths: dict[
        Annotated[str, Field(pattern=_VARIABLE_NAME)],
        Annotated[JSONPath, BeforeValidator(_parse_path)],
    ] = Field(default_factory=dict)
    template: Any = None
    constant: Any = None
    keep_cloudevent: StrictBool = False

    @field_validator("template", "constant")
    @classmethod
    def _fit(cls, value: Any) -> Any:
        problem = _unfit(value, MAX_TEMPLATE_DEPTH)
        if problem is not None:
            raise PydanticCustomError("value", "{problem}", {"problem": problem})
        return value

    @field_validator("template")
    @classmethod
    def _known_placeholders(cls, template: Any, info: ValidationInfo) -> Any:
        if "input_paths" not in info.data:
            return template  # already reported: a broken input_paths
        unknown = set(_uses(template)) - set(info.data["input_paths"])
        if unknown:
            raise PydanticCustomError(
                "template",
                "unknown variable <{name}> (define it under input_paths)",
                {"name": min(unknown)},
            )
        return template

    @model_validator(mode="after")
    def _one_output(self) -> TransformSpec:
        has_template = "template" in self.model_fields_set
        has_constant = "constant" in self.model_fields_set
        if has_template == has_constant:
            raise PydanticCustomError("transform", "give exactly one of 'template' or 'constant'")
        if has_constant and self.input_paths:
            raise PydanticCustomError(
                "transform", "'input_paths' are only used by a 'template', not a 'constant'"
            )
        return self


@dataclass(frozen=True)
class Transform:
    """A compiled transform; ``apply`` raises for a JSON-shaped event only over its bound."""

    variables: tuple[Variable, ...]
    render: Render
    keep_cloudevent: bool
    many: bool = False
    """Whether the output is measured: a path may select several values, or the template
    places its values more than ``_UNMEASURED_USES`` times."""

    @classmethod
    def compile(cls, spec: TransformSpec) -> Transform:
        """Compile a validated spec; never raises (validation already checked everything)."""
        placed = _uses(spec.template) if "template" in spec.model_fields_set else []
        # Only the variables the template places are evaluated: each one unused cost its
        # search all the same (40 unused filter paths over a 250 KB event: 8 s of the router)
        variables = tuple(
            Variable(name, path, not _definite(path), _count(path, Filter) > 0)
            for name, path in spec.input_paths.items()
            if name in placed
        )
        if "constant" in spec.model_fields_set:
            constant = spec.constant
            render: Render = lambda values: constant  # noqa: E731
        else:
            render = _compile_template(spec.template)
        uses = len(placed)
        many = uses > _UNMEASURED_USES or any(v.many for v in variables)
        return cls(variables, render, spec.keep_cloudevent, many)

    def _values(self, event: dict[str, Any]) -> dict[str, Any]:
        """Each variable's value in ``event``; raises TransformTooLarge once the searches have
        taken more than ``MAX_TRANSFORM_SECONDS`` (each search is bounded by the event's size;
        their number, by nothing: they ran on the router's loop for seconds)."""
        values = {}
        deadline = time.perf_counter() + MAX_TRANSFORM_SECONDS
        for i, variable in enumerate(self.variables):
            # checked before each search but the first: one that finished counts
            if i and time.perf_counter() > deadline:
                raise TransformTooLarge(
                    f"its input paths took more than {MAX_TRANSFORM_SECONDS:g} s on this event"
                )
            values[variable.name] = variable.value(event)
        return values

    def apply(self, event: dict[str, Any]) -> Any:
        """The payload for a target: the rendered output, or with ``keep_cloudevent`` a copy of
        ``event`` whose ``data`` is that output (``data_base64`` and ``dataschema`` dropped,
        ``datacontenttype`` set to match). Raises TransformTooLarge for a transform with a
        multi-valued path (or a template placing values many times) whose output is over its
        bound, and for a selected value JSON cannot write put into text."""
        output = self.render(self._values(event))
        if self.many and _size(output) > MAX_OUTPUT_BYTES:
            raise TransformTooLarge(f"the output is more than {MAX_OUTPUT_BYTES} bytes")
        if not self.keep_cloudevent:
            return output
        attributes = {
            key: value
            for key, value in event.items()
            if key not in ("data", "data_base64", "dataschema")
        }
        # the charset said: a receiver taking text/* for ISO-8859-1 (servlets, requests)
        # garbled the UTF-8 it got, as without keep_cloudevent it was never told to
        attributes["datacontenttype"] = (
            "text/plain; charset=utf-8" if isinstance(output, str) else "application/json"
        )
        attributes["data"] = output
        return attributes
