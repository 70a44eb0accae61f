"""Per-target protection in front of every delivery attempt: a circuit breaker and a rate limit.

Where it sits: the dispatcher asks ``Guard.admit()`` before an attempt and reports the outcome
with ``Guard.record()``. An open circuit does not drop anything: the dispatcher parks the
delivery in the durable retry schedule until ``reopen_at``. State is per process (each instance
learns an endpoint's health from its own attempts), as in Dapr's resiliency policies.

Breaker states: closed (normal) -> open after N consecutive failures -> half-open once
``open_for`` has passed, letting one probe through -> closed on its success, open again on
its failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from eventbus import metrics
from eventbus._bucket import TokenBucket
from eventbus.delivery._policy import BreakerPolicy
from eventbus.targets import Outcome

__all__ = ["CIRCUIT_STATES", "Admission", "Guard"]

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
CIRCUIT_STATES = ("closed", "half-open", "open")
"""The names of the states, by their value in ``eventbus_circuit_state``."""


@dataclass(frozen=True, slots=True)
class Admission:
    """``allowed`` or, when the circuit is open, the monotonic time it may be probed again."""

    allowed: bool
    reopen_in: float = 0.0


class Guard:
    """Circuit breaker plus token-bucket rate limit for one target."""

    def __init__(
        self,
        target: str,
        breaker: BreakerPolicy | None,
        rate_limit: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._target = target
        self._breaker = breaker
        self._clock = clock
        self._sleep = sleep
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._reclosed = False
        self._bucket = None if rate_limit is None else TokenBucket(rate_limit, rate_limit, clock)
        self._lock = asyncio.Lock()
        metrics.CIRCUIT_STATE.labels(target).set(CLOSED)

    @property
    def state(self) -> str:
        return CIRCUIT_STATES[self._state]

    def admit(self) -> Admission:
        """May an attempt go to the target now? Never waits."""
        b = self._breaker
        if b is None or self._state == CLOSED:
            return Admission(True)
        elapsed = self._clock() - self._opened_at
        if self._state == OPEN and elapsed >= b.open_for:
            self._set(HALF_OPEN)
        if self._state == HALF_OPEN:
            if not self._probing:
                self._probing = True
                return Admission(True)
            # the probe is out: the others wait a full period, not a busy loop of re-parking
            return Admission(False, b.open_for)
        return Admission(False, max(b.open_for - elapsed, 0.05))

    def record(self, success: bool) -> None:
        """Report the outcome of an admitted attempt."""
        b = self._breaker
        if b is None:
            return
        if success:
            self._failures = 0
            self._probing = False
            if self._state != CLOSED:
                self._set(CLOSED)
                self._reclosed = True
            return
        self._failures += 1
        if self._state == HALF_OPEN or self._failures >= b.failures:
            self._probing = False
            self._opened_at = self._clock()
            self._set(OPEN)

    def settle(self, outcome: Outcome) -> None:
        """Report an admitted attempt's outcome. An answer from the target tells its health: a
        2xx, or a 4xx that is the request's fault, is a success; a retryable failure (5xx, no
        answer in time, unreachable) a failure. One that tells nothing of it is neither: not
        sent (no connection of the pool), or refused for good without an answer (a record too
        large for the client, a payload that cannot be built, a rejected certificate); it
        closed the count of failures, and a circuit never opened in an outage that such
        failures were mixed into."""
        if outcome.unsent or (
            not outcome.delivered and not outcome.retryable and outcome.status is None
        ):
            self.release()
        else:
            self.record(outcome.delivered or not outcome.retryable)

    def release(self) -> None:
        """An admitted attempt was not made after all (a synchronous invocation found the
        target's concurrency cap full, a request found no place in the HTTP client's pool): a
        half-open circuit lets the next one probe."""
        self._probing = False

    def reclosed(self) -> bool:
        """Whether the circuit closed again since the last call (a probe succeeded): the
        deliveries parked behind it may go now, not a full ``open_for`` later."""
        reclosed, self._reclosed = self._reclosed, False
        return reclosed

    def _set(self, state: int) -> None:
        self._state = state
        metrics.CIRCUIT_STATE.labels(self._target).set(state)

    async def wait_turn(self) -> None:
        """:meth:`throttle` for an admitted attempt: cancelled while waiting for its token, it
        releases its admission (a half-open probe left outstanding refused the target until a
        restart)."""
        try:
            await self.throttle()
        except BaseException:
            self.release()
            raise

    def give_back_turn(self) -> None:
        """An attempt that took its rate-limit token was not made after all (parked behind a
        circuit that opened while it waited): the token goes to the next one."""
        if self._bucket is not None:
            self._bucket.give_back()

    async def throttle(self) -> None:
        """Wait for a rate-limit token (no-op without a limit). Waits are short and bounded:
        at most one token interval per waiter ahead in line."""
        bucket = self._bucket
        if bucket is None:
            return
        async with self._lock:
            while not bucket.take():
                await self._sleep(bucket.wait())
