"""A token bucket: the one pacing that a target's rate limit (``delivery``) and a source's dead
letters (``sources``) share."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` of them held (at least one: below 1/s a
    bucket of ``rate`` tokens never held the one a turn takes, and every turn waited for
    ever). Full at first."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._tokens = self.burst
        self._refilled = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    def take(self) -> bool:
        """Take a token, if one is there now."""
        self._refill()
        # the epsilon keeps float rounding (0.1 * 10 == 0.9999...) from looping forever
        if self._tokens >= 1.0 - 1e-9:
            self._tokens = max(self._tokens - 1.0, 0.0)
            return True
        return False

    def give_back(self) -> None:
        """Return a token taken for a turn that was not used after all (the time since the
        last take counted first: capped before it, the refill was lost)."""
        self._refill()
        self._tokens = min(self.burst, self._tokens + 1.0)

    def wait(self) -> float:
        """Seconds until the next token is there (a millisecond at least)."""
        return max((1.0 - self._tokens) / self.rate, 1e-3)
