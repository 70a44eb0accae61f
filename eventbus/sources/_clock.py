"""Time for sources: where they read the clock and wait, and the backoff they wait with.

Where it sits: every source and the :class:`~eventbus.sources.SourceRunner` take a
:class:`Clock` (the real :class:`SystemClock` unless a test hands in one it moves by hand), so
schedules, retries and restarts are tested without real sleeps.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Backoff", "Clock", "SystemClock"]


class Clock(Protocol):
    """Where sources read the time and wait: real in production, manual in tests."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (cancellable)."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class Backoff:
    """Capped exponential backoff on a :class:`Clock`: initial, 2x, 4x ... up to ``maximum``."""

    def __init__(self, clock: Clock, *, initial: float = 0.5, maximum: float = 30.0) -> None:
        self._clock = clock
        self._initial = initial
        self._maximum = maximum
        self._next = initial

    def reset(self) -> None:
        """Start again from ``initial`` (call after a success)."""
        self._next = self._initial

    async def wait(self) -> None:
        """Sleep the current delay on the clock, then double it (up to ``maximum``)."""
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        await self._clock.sleep(delay)
