"""Reading an RFC 3339 timestamp: one place for what Python's parser refuses and RFC 3339
allows (lower-case ``t`` and ``z``, a leap second), shared by validation and the audit trail so
that the instant the one accepts is the instant the other stores. Also the Unix seconds of a
signed request's timestamp header, read alike by the webhook triggers and ``verify_webhook``."""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["read_time", "unix_seconds"]

_LEAP_SECOND = timedelta(seconds=1)


def read_time(text: str) -> datetime:
    """``datetime.fromisoformat(text)``, also reading lower-case ``t``/``z`` and a leap second
    (``:60`` is the instant one second after ``:59``). It checks no RFC 3339 syntax beyond the
    parser's own. Raises ValueError when it cannot be read, OverflowError when a leap second
    passes year 9999."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        leap = text[17:19] == "60"
        moment = datetime.fromisoformat((text[:17] + "59" + text[19:] if leap else text).upper())
        return moment + _LEAP_SECOND if leap else moment


def unix_seconds(text: str) -> int | None:
    """``text`` as Unix seconds, or None: digits only, and few enough for a float (``int()``
    also takes signs, spaces and underscores, and a few hundred digits overflowed the float
    comparison with the clock: a 500, not a 401)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        return None
    return int(text)
