"""JSON for PostgreSQL ``jsonb`` columns, lossless for every JSON value.

``jsonb`` cannot hold the character U+0000, which CloudEvents data may carry. Such a value is
stored as ``{"$eventbus.b64": "<base64 of its JSON>"}`` and read back as the original value, so
an event with a NUL in its data is audited, retried and dead-lettered like any other instead
of failing every write (and being redelivered forever). An object keeps beside it the entries
that hold no U+0000, for SQL to read as usual (an event's attributes: a reply whose data held
one vanished from its cause's trail, found by its ``eventbuscausesource``).
"""

from __future__ import annotations

import base64
import re
from typing import Any

import orjson

__all__ = ["dumps_jsonb", "loads_jsonb"]

_WRAP = "$eventbus.b64"
_NUL = b"\\u0000"
# the escape itself, not the text "\u0000" (written "\\u0000" in JSON): an even run of
# backslashes before it, none included
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def dumps_jsonb(value: Any, *, default: Any = None) -> str:
    """Text for a jsonb parameter. Raises orjson.JSONEncodeError / TypeError as orjson does."""
    raw = orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS)
    if _NUL in raw and _NUL_ESCAPE.search(raw) is not None:
        wrapped: dict[Any, Any] = {_WRAP: base64.b64encode(raw).decode()}
        if isinstance(value, dict):
            for key, item in value.items():
                text = orjson.dumps({key: item}, default=default, option=orjson.OPT_NON_STR_KEYS)
                if key != _WRAP and _NUL_ESCAPE.search(text) is None:
                    wrapped[key] = item
        return orjson.dumps(wrapped, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    return raw.decode()


def loads_jsonb(text: str | bytes | Any) -> Any:
    """The value ``dumps_jsonb`` stored (``text`` as asyncpg returns jsonb: a str)."""
    value = orjson.loads(text) if isinstance(text, str | bytes) else text
    if isinstance(value, dict) and isinstance(value.get(_WRAP), str):
        return orjson.loads(base64.b64decode(value[_WRAP]))
    return value
