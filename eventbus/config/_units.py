"""Units in the files users write: durations (``10s``, ``5m``, ``1d``) in connector definitions,
delivery policies and rules.

Where it sits: at the bottom of the configuration layer, with no eventbus import at all, so the
connector specs (``eventbus.config``) and the delivery policies (``eventbus.delivery``) parse
durations the same way without either importing the other.
"""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ValidationInfo, field_validator

__all__ = ["MAX_DURATION", "Duration", "NumbersNotBools", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


MAX_DURATION = 10 * 365 * 86400.0
"""Ten years: longer waits are mistakes (a retry delay of 99999999999d passed, then every
retry failed to be scheduled, the event redelivered again and again)."""


def parse_duration(value: object) -> float:
    """``1.5``, ``"250ms"``, ``"10s"``, ``"5m"``, ``"6h"``, ``"1d"`` -> seconds (float, from 0 to
    :data:`MAX_DURATION`).

    Raises ValueError for anything else, including negative numbers, NaN and infinity.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    seconds: float | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value}")
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 10s, 5m, 6h, 1d)")
    if not seconds <= MAX_DURATION:  # NaN and infinity too
        raise ValueError(f"duration must be at most 10 years (3650d), got {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type accepting ``10``, ``"250ms"``, ``"10s"``, ``"5m"``, ``"6h"``, ``"1d"``."""


class NumbersNotBools(BaseModel):
    """The base of a model read from a file users write: a number field refuses true and
    false, which pydantic takes for 1 and 0 ("max_in_flight: on" routed one message at a
    time, "port: yes" listened on port 1, a delivery's "rate_limit: yes" sent one event a
    second)."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_true_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = None if info.field_name is None else cls.model_fields[info.field_name]
        if isinstance(value, bool) and field is not None and _a_number(field.annotation):
            raise ValueError("a number, not true or false")
        return value


def _a_number(annotation: object) -> bool:
    """Whether a field typed ``annotation`` takes a number and not a bool (``int``,
    ``float | None``, ``Annotated[int, ...] | None``; not ``list[int]``)."""
    union = get_origin(annotation) in (Union, types.UnionType)
    kinds = set()
    for kind in get_args(annotation) if union else (annotation,):
        if get_origin(kind) is Annotated:
            kind = get_args(kind)[0]
        kinds.add(kind)
    return bool(kinds & {int, float}) and bool not in kinds
