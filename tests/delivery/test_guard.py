"""Circuit breaker and rate limit, on an injected clock: pure state machines, no servers."""

from __future__ import annotations

import asyncio
import contextlib

from eventbus.delivery import BreakerPolicy, Guard
from eventbus.targets import Outcome
from eventbus.targets._base import failure


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = Clock()
    guard = Guard("t1", BreakerPolicy(failures=3, open_for=60), None, clock)
    for _ in range(2):
        assert guard.admit().allowed
        guard.record(False)
    guard.record(True)  # a success resets the count
    for _ in range(3):
        assert guard.admit().allowed
        guard.record(False)
    assert guard.state == "open"
    refused = guard.admit()
    assert not refused.allowed and refused.reopen_in == 60

    clock.now += 30
    assert guard.admit().reopen_in == 30
    clock.now += 30
    assert guard.admit().allowed  # the one probe
    assert guard.state == "half-open"
    waiting = guard.admit()  # nobody else while the probe is out, and not a busy loop
    assert not waiting.allowed and waiting.reopen_in == 60
    guard.record(False)
    assert guard.state == "open"

    clock.now += 60
    assert guard.admit().allowed
    guard.record(True)
    assert guard.state == "closed"
    assert all(guard.admit().allowed for _ in range(10))


def test_a_probe_not_made_after_all_lets_the_next_one_probe() -> None:
    clock = Clock()
    guard = Guard("t3", BreakerPolicy(failures=1, open_for=60), None, clock)
    guard.record(False)
    clock.now += 60
    assert guard.admit().allowed  # the probe, but the invocation found the cap full
    assert not guard.admit().allowed
    guard.release()
    assert guard.state == "half-open"
    assert guard.admit().allowed  # the next caller probes
    guard.record(True)
    assert guard.state == "closed"


def test_no_breaker_always_admits() -> None:
    guard = Guard("t2", None, None, Clock())
    for _ in range(100):
        guard.record(False)
    assert guard.admit().allowed and guard.state == "closed"


async def test_rate_limit_spaces_attempts() -> None:
    clock = Clock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    guard = Guard("t3", None, 10.0, clock, sleep)
    for _ in range(30):
        await guard.throttle()
    # a burst of one second's worth (10) goes at once; the other 20 wait 0.1 s each
    assert len(slept) == 20
    assert abs(sum(slept) - 2.0) < 1e-6


async def test_a_rate_below_one_per_second_spaces_attempts_too() -> None:
    # The bucket held at most `rate` tokens and an attempt takes one: at 0.5/s no attempt
    # ever went, and every delivery to the target (and every synchronous call) waited for ever.
    clock = Clock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds
        await asyncio.sleep(0)  # (the timeout below can then fire)

    guard = Guard("slow", None, 0.5, clock, sleep)
    async with asyncio.timeout(5):
        for _ in range(4):
            await guard.throttle()
    # the first at once, then one every 2 s
    assert abs(sum(slept) - 6.0) < 1e-6


async def test_a_probe_cancelled_while_waiting_for_its_token_is_released() -> None:
    # Admitted as the half-open probe, then cancelled waiting for a rate-limit token (a
    # synchronous caller gone, a shutdown): the probe stayed outstanding and every later
    # attempt was refused until a restart.
    clock = Clock()
    guard = Guard("t-probe", BreakerPolicy(failures=1, open_for=10), 1.0, clock)
    assert guard.admit().allowed
    guard.record(False)
    clock.now += 10
    await guard.throttle()  # someone takes the token
    assert guard.admit().allowed  # the probe
    waiting = asyncio.create_task(guard.wait_turn())  # the next token: the clock stands still
    await asyncio.sleep(0.05)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert guard.admit().allowed  # another may probe


def test_outcomes_that_tell_nothing_of_the_target_neither_open_nor_close_it() -> None:
    # Failures raised before anything reached the target (a record too large for the client,
    # no connection of the pool) counted as successes: mixed into an outage, the circuit never
    # opened (31 timeouts in 30 s, nothing parked, in a review).
    clock = Clock()
    guard = Guard("t4", BreakerPolicy(failures=3, open_for=60), None, clock)
    timeout = failure("timeout after 10s", 10_000, retryable=True, timed_out=True)
    too_large = failure("record too large", 1, retryable=False)
    unsent = failure("not sent: all 512 connections ...", 10_000, retryable=True, unsent=True)
    refused = Outcome(
        delivered=False, status=400, duration_ms=3, error="400", retryable=False, retry_after=None
    )
    for outcome in (timeout, too_large, timeout, unsent, timeout):
        assert guard.admit().allowed
        guard.settle(outcome)
    assert guard.state == "open"  # three timeouts, the others not counted either way
    clock.now += 60
    assert guard.admit().allowed  # the probe
    guard.settle(too_large)
    assert guard.state == "half-open" and guard.admit().allowed  # the next one probes
    guard.settle(refused)  # the target answered: the request's fault, the target is up
    assert guard.state == "closed"


async def test_a_turn_given_back_goes_to_the_next_attempt() -> None:
    # A delivery that took its token and was then parked behind a circuit that opened while
    # it waited spent the token all the same: the next attempt waited a whole interval more.
    clock = Clock()
    guard = Guard("given-back", None, 1.0, clock)
    await guard.throttle()  # the burst's one token
    guard.give_back_turn()
    assert guard._bucket is not None and guard._bucket.take()  # there again at once
    guard.give_back_turn()
    guard.give_back_turn()  # never more than the burst
    assert guard._bucket.take() and not guard._bucket.take()
    clock.now += 1.0
    assert guard._bucket.take()
