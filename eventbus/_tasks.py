"""Stopping a long-running worker: the one shutdown the router and the retry worker share.

Both have a loop that takes work (bus messages, due retry rows) and starts a task per item.
Stopping first ends the loop, so nothing new starts, then lets the items already started finish
within a grace period: work cut short is not lost (an un-acked bus message is redelivered, a
claimed retry row is due again when its lease ends), but finishing it spares the redelivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

__all__ = ["cancel_and_wait", "stop_with_grace"]


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and return once it has ended; whatever it raised is dropped."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def stop_with_grace(
    loop: asyncio.Task[Any] | None, inflight: Collection[asyncio.Task[Any]], grace: float
) -> None:
    """Stop ``loop`` (the task that starts work), give the tasks it started (``inflight``) up
    to ``grace`` seconds to finish, then cancel the rest and wait for them to end."""
    await cancel_and_wait(loop)
    if inflight:
        _, late = await asyncio.wait(set(inflight), timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
