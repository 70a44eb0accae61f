"""Stopping a long-running worker: the one shutdown the router and the retry worker share.

Both have a loop that takes work (bus messages, due retry rows) and starts a task per item.
Stopping first ends the loop, so nothing new starts, then lets the items already started finish
within a grace period: work cut short is not lost (an un-acked bus message is redelivered, a
claimed retry row is due again when its lease ends), but finishing it spares the redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any, TypeVar

__all__ = [
    "cancel_and_wait",
    "in_daemon_thread",
    "report_stuck",
    "stop_if_cancelled",
    "stop_with_grace",
    "wait_event",
]

log = logging.getLogger("eventbus")

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` run in a thread of its own that nothing waits for: a blocking network call
    (a listing from an endpoint that stopped answering) neither holds the process's exit, as
    ``asyncio.to_thread``'s pool does (``asyncio.run`` and the interpreter join its threads),
    nor its caller's cancellation, which returns at once and leaves the thread to end by
    itself, its result dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the caller, whatever it is
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


async def cancel_and_wait(task: asyncio.Task[Any] | None, *, again_after: float = 10.0) -> None:
    """Cancel ``task`` (if any) and return once it has ended; whatever it raised is dropped.

    A task still running ``again_after`` seconds after its cancellation is cancelled again
    (with a warning), and so on: a client library that lost the first one (see
    ``stop_if_cancelled``) cannot hold a shutdown forever. The caller's own cancellation is
    passed on to ``task`` and raised."""
    if task is None:
        return
    task.cancel()
    try:
        while not task.done():
            await asyncio.wait((task,), timeout=again_after)
            if not task.done():
                log.warning(
                    "task %s still running %g s after it was cancelled; cancelling it again",
                    task.get_name(),
                    again_after,
                )
                task.cancel()
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def wait_event(event: asyncio.Event, within: float) -> bool:
    """Wait until ``event`` is set, at most ``within`` seconds; True when it was. Built on
    ``asyncio.timeout``, which keeps a cancellation that 3.11's ``wait_for`` may lose."""
    try:
        async with asyncio.timeout(within):
            await event.wait()
    except TimeoutError:
        return False
    return True


def stop_if_cancelled() -> None:
    """Raise CancelledError when the current task was cancelled but carries on.

    Python 3.11's ``asyncio.wait_for`` returns normally when its task is cancelled just as
    the awaited future completes (fixed in 3.12), and nats-py waits through it: the
    cancellation is lost, and a loop meant to run until cancelled would never end (nor the
    shutdown waiting for it). Such a loop calls this once per round: a lost cancellation then
    ends it one round later. eventbus's own code uses ``asyncio.timeout``, which loses none."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop_with_grace(
    loop: asyncio.Task[Any] | None,
    inflight: Collection[asyncio.Task[Any]],
    grace: float,
    hurry: asyncio.Event | None = None,
) -> int:
    """Stop ``loop`` (the task that starts work), give the tasks it started (``inflight``) up
    to ``grace`` seconds to finish, or until ``hurry`` is set, then cancel the rest and wait
    for them to end; returns how many were cancelled so."""
    await cancel_and_wait(loop)
    if not inflight:
        return 0
    tasks = set(inflight)
    if hurry is None:
        await asyncio.wait(tasks, timeout=grace)
    elif not hurry.is_set():
        finished = asyncio.create_task(asyncio.wait(tasks))
        hurried = asyncio.create_task(hurry.wait())
        try:
            await asyncio.wait(
                (finished, hurried), timeout=grace, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            await cancel_and_wait(finished)
            await cancel_and_wait(hurried)
    late = [task for task in tasks if not task.done()]
    await asyncio.gather(*(cancel_and_wait(task) for task in late))
    return len(late)


async def report_stuck(what: str, after: float, every: float = 30.0) -> None:
    """Sleep ``after`` seconds, then log (and again every ``every`` s) each task still running
    with where it waits: run beside a shutdown that should be over by then, and cancel it once
    the shutdown has ended. A stuck shutdown then says what it waits for."""
    await asyncio.sleep(after)
    waited = after
    me = asyncio.current_task()
    while True:
        stacks = []
        for task in asyncio.all_tasks():
            if task is me:
                continue
            out = io.StringIO()
            task.print_stack(file=out)
            stacks.append(out.getvalue())
        log.warning("%s still running after %g s; waiting in:\n%s", what, waited, "".join(stacks))
        await asyncio.sleep(every)
        waited += every
