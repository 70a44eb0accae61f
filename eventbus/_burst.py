"""Warning of something that comes in bursts (inputs dead-lettered, messages dropped, a broker's
failed connects) without a line for each: the first one at once, those after it within
``every`` seconds counted and told in one line when the period ends, or at :meth:`flush` (the
owner stopping). Told only with the next one, a burst that ended was never told; told at each
one, a flood wrote as many lines.

Where it sits: at the bottom, beside ``_errors``; no eventbus import.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

__all__ = ["Burst"]


class Burst:
    """Calls ``say(message, more)`` for the first message, then at most once per ``every``
    seconds: ``message`` the last one, ``more`` how many others came since the line before.
    Call it from the event loop's thread."""

    def __init__(self, say: Callable[[str, int], None], every: float) -> None:
        self._say = say
        self._every = every
        self._said_at = -math.inf
        self._unsaid = 0
        self._last = ""
        self._later: asyncio.TimerHandle | None = None

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self._said_at >= self._every:
            self._tell(message, self._unsaid, now)
            return
        self._unsaid += 1
        self._last = message
        if self._later is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): told with the next one
                return
            self._later = loop.call_later(self._said_at + self._every - now, self.flush)

    def flush(self) -> None:
        """Tell what is counted and not told yet (the period ended, or the owner stops); a
        timer is pending only while something is."""
        if self._unsaid:
            self._tell(self._last, self._unsaid - 1, time.monotonic())  # the last is the line's

    def _tell(self, message: str, more: int, now: float) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._said_at, self._unsaid = now, 0
        self._say(message, more)
