"""Collecting publish acks (``collect_acks``), one future and several alike: an ack, a
duplicate, a failure, a cancelled publish (the bus closing) and one without an answer in time
each become the outcome the bus reports; a caller cancelled while waiting stays cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from eventbus._errors import BusError, BusUnavailable
from eventbus.bus._base import DUPLICATE, Behind, InFlightWindow, PublishOutcome, collect_acks


def _translate(exc: BaseException) -> BusError:
    return BusUnavailable(f"publish failed: {exc!r}")


def _settle(future: asyncio.Future[Any], how: str) -> None:
    if how == "ack":
        future.set_result({"duplicate": False})
    elif how == "duplicate":
        future.set_result({"duplicate": True})
    elif how == "error":
        future.set_exception(OSError("connection reset"))
    elif how == "cancelled":
        future.cancel()
    # "silent": never answered


async def _outcomes(hows: list[str], within: float = 0.05) -> list[PublishOutcome]:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in hows]
    for future, how in zip(futures, hows, strict=True):
        loop.call_soon(_settle, future, how)
    results: list[PublishOutcome] = [None] * len(hows)
    await collect_acks(
        {f: i for i, f in enumerate(futures)},
        results,
        within,
        _translate,
        duplicate=lambda ack: bool(ack["duplicate"]),
    )
    return results


def _shape(outcome: PublishOutcome) -> str:
    if outcome is None:
        return "stored"
    if outcome == DUPLICATE:
        return "duplicate"
    assert isinstance(outcome, BusUnavailable)
    return str(outcome)


@pytest.mark.parametrize("how", ["ack", "duplicate", "error", "cancelled", "silent"])
async def test_one_future_reports_as_many_do(how: str) -> None:
    (alone,) = await _outcomes([how])
    (_, among) = await _outcomes(["ack", how])
    assert _shape(alone) == _shape(among)
    expected = {
        "ack": "stored",
        "duplicate": "duplicate",
        "error": "publish failed: OSError('connection reset')",
        "cancelled": "publish failed: TimeoutError('cancelled: the bus is closing')",
        "silent": "publish failed: TimeoutError('no ack within 0.05 s')",
    }
    assert _shape(alone) == expected[how]


async def test_a_cancelled_caller_stays_cancelled() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    results: list[PublishOutcome] = [None]
    waiting = asyncio.ensure_future(collect_acks({future: 0}, results, 10.0, _translate))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


def test_events_that_begin_to_wait_after_a_quiet_spell_are_not_a_stall_at_once() -> None:
    # The quiet time was counted from the last message received: a consumer idle for minutes
    # was reported stalled "for 114 s" within a second of a burst reaching the broker, and
    # every instance of a group out of readiness at once.
    now = [100.0]
    behind = Behind(lambda: now[0])
    window = InFlightWindow(10)
    window.released_at = 0.0
    now[0] = 500.0  # minutes without a message, and none waiting
    assert behind.stalled(window, 30.0) is None
    behind.waiting = 39  # a burst
    now[0] = 529.0
    behind.waiting = 40
    assert behind.stalled(window, 30.0) is None  # waiting for 29 s
    now[0] = 531.0
    assert behind.stalled(window, 30.0) == (
        "40 events wait on the broker for this consumer, and none has come for 31 s though "
        "it has room"
    )
    behind.waiting = 0  # read meanwhile, then more
    behind.waiting = 3
    assert behind.stalled(window, 30.0) is None
