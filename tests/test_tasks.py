"""Stopping long-running tasks: a cancellation is never lost, and a stuck stop says where.

Python 3.11's ``asyncio.wait_for`` returns normally when its task is cancelled just as the
awaited future completes: a loop meant to run until cancelled then never ends, and neither does
the shutdown waiting for it (seen as a SIGTERM that needed a SIGKILL, and a Kafka consumer that
never stopped). eventbus's code waits with ``asyncio.timeout`` instead, and its loops over
client libraries that still use ``wait_for`` call ``stop_if_cancelled`` once per round.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

import eventbus
from eventbus._tasks import cancel_and_wait, report_stuck, stop_if_cancelled, wait_event
from eventbus.bus._base import InFlightWindow
from tests.fixtures.wait import eventually

PACKAGE = Path(eventbus.__file__).parent


async def test_a_window_wait_cancelled_as_a_slot_frees_still_ends() -> None:
    """The race that lost the cancellation: the slot frees and the cancel arrives in the
    same turn of the loop. The waiting task must end cancelled, not return and go on."""
    window = InFlightWindow(1)
    window.take()
    waiting = asyncio.create_task(window.wait(60))
    await asyncio.sleep(0)  # now inside wait()
    window.release()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_loop_over_a_call_that_loses_its_cancellation_still_ends() -> None:
    rounds = 0

    async def lossy() -> None:
        # what 3.11's wait_for does when the future it waits for completes as it is cancelled
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return

    async def loop() -> None:
        nonlocal rounds
        while True:
            stop_if_cancelled()
            rounds += 1
            await lossy()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.cancelled()
    assert rounds == 1


async def test_a_task_that_is_not_cancelled_is_not_stopped() -> None:
    async def inner() -> str:
        # a cancellation of another task, caught here, is not this task's
        other = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        await cancel_and_wait(other)
        stop_if_cancelled()
        return "went on"

    assert await asyncio.create_task(inner()) == "went on"


def test_eventbus_never_waits_with_asyncio_wait_for() -> None:
    """``asyncio.timeout`` keeps every cancellation; on 3.11 ``wait_for`` may lose one."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "wait_for"
                and isinstance(node.value, ast.Name)
                and node.value.id == "asyncio"
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"asyncio.wait_for used at {found}: use asyncio.timeout"


async def test_a_stuck_stop_logs_where_each_task_waits(caplog: pytest.LogCaptureFixture) -> None:
    async def held_by_a_lock(lock: asyncio.Lock) -> None:
        async with lock:
            pass

    lock = asyncio.Lock()
    await lock.acquire()
    stuck = asyncio.create_task(held_by_a_lock(lock), name="stuck-one")
    watchdog = asyncio.create_task(report_stuck("shutdown", 0.05, every=0.05), name="watchdog")
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        await eventually(lambda: len(caplog.records) >= 2, within=5, what="two reports")
    await cancel_and_wait(watchdog)
    lock.release()
    await stuck
    first, second = caplog.records[:2]
    assert first.getMessage().startswith("shutdown still running after 0.05 s")
    assert second.getMessage().startswith("shutdown still running after 0.1 s")
    assert "stuck-one" in first.getMessage()
    assert "held_by_a_lock" in first.getMessage()
    assert "name='watchdog'" not in first.getMessage()  # not itself


async def test_a_stop_cancelled_while_waiting_is_cancelled_too() -> None:
    """``cancel_and_wait`` passes on its caller's own cancellation (a shutdown cut short),
    where ``with suppress(CancelledError): await task`` would swallow it and go on."""
    cleaning = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaning.set()
            await asyncio.sleep(3600)  # a cleanup that would take long

    worker = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    went_on = False

    async def stopper() -> None:
        nonlocal went_on
        await cancel_and_wait(worker)
        went_on = True

    stopping = asyncio.create_task(stopper())
    await cleaning.wait()
    stopping.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await stopping
    assert not went_on
    # and the worker, whose cleanup it was waiting for, was cancelled again
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await worker


async def test_a_task_that_lost_its_cancellation_is_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def deaf() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # as a library that lost it
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)  # and goes on waiting

    task = asyncio.create_task(deaf(), name="deaf")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        async with asyncio.timeout(5):
            await cancel_and_wait(task, again_after=0.05)
    assert task.cancelled()
    assert "task deaf still running 0.05 s after it was cancelled" in caplog.text


async def test_wait_event_says_whether_the_event_came_in_time() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True
