"""A client started in the background and shared by concurrent deliveries.

Place in the pipeline: inside the Kafka and NATS targets, between ``deliver`` and the library's
producer or connection. A broker that is down must not stop the service from starting, so a
target begins the start when it opens and returns at once; deliveries join the start in
progress, and the first delivery after a failed start (or after the client died) begins a new
one. The library-specific parts (how to start, whether a client is still usable, how to stop
it) stay in each target.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from eventbus._burst import Burst
from eventbus._tasks import cancel_and_wait

__all__ = ["LazyClient"]

T = TypeVar("T")

FAILED_SAID_EVERY = 10.0
"""Seconds between two warnings of a client's failed starts (counted in between)."""


class LazyClient(Generic[T]):
    """One client of type ``T``, started in the background by ``start`` while ``owner`` is open.

    ``start`` makes a started client or raises (and cleans up after itself); ``usable`` says
    whether a started client can still be used (a lost connection cannot). A failed start is
    logged as a warning on ``log`` (the target's logger), prefixed with ``failed``; ``task_name``
    names the start task.
    """

    def __init__(
        self,
        start: Callable[[], Awaitable[T]],
        *,
        owner: str,
        usable: Callable[[T], bool],
        log: logging.Logger,
        failed: str,
        task_name: str,
    ) -> None:
        self._start = start
        self._owner = owner
        self._usable = usable
        self._log = log
        self._failed = failed
        self._task_name = task_name
        self._client: T | None = None
        self._task: asyncio.Task[T] | None = None
        self._open = False
        self._failures = Burst(self._tell, FAILED_SAID_EVERY)

    def open(self) -> None:
        """Begin a start in the background and return at once.

        Never raises for a failing start (it is logged); raises ``RuntimeError`` if already open.
        """
        if self._open:
            raise RuntimeError(f"{self._owner} is already open")
        self._open = True
        self._begin()

    def check_open(self) -> None:
        """Raises ``RuntimeError`` unless open (the owner is used outside ``async with``)."""
        if not self._open:
            raise RuntimeError(f"{self._owner} is not open: use 'async with'")

    async def get(self) -> T:
        """The started client, joining the start in progress or beginning a new one.

        Raises whatever ``start`` raises. Cancelling the caller does not cancel the start that
        other deliveries may be waiting on.
        """
        client = self._client
        if client is not None and self._usable(client):
            return client
        task = self._task
        if task is None or task.done():
            # Never begun, failed, or its client has become unusable since: start again.
            self._client = None
            task = self._begin()
        return await asyncio.shield(task)

    def discard(self, client: T) -> bool:
        """Stop handing out ``client`` (it works but cannot be trusted any more); the next
        ``get`` starts a new one. True when it was the current client: the caller stops it."""
        if self._client is not client:
            return False
        self._client = None
        return True

    async def close(self) -> T | None:
        """Close: cancel a pending start and hand back the client, if any, for the caller to stop.

        Never raises for the start: its failure has already been logged.
        """
        self._open = False
        self._failures.flush()
        task, self._task = self._task, None
        if task is not None and not task.done():
            await cancel_and_wait(task)
        client, self._client = self._client, None
        return client

    def _begin(self) -> asyncio.Task[T]:
        task = asyncio.create_task(self._run(), name=self._task_name)
        task.add_done_callback(self._done)
        self._task = task
        return task

    async def _run(self) -> T:
        client = await self._start()
        self._client = client
        return client

    def _done(self, task: asyncio.Task[T]) -> None:
        # Retrieve the failure here so a start nobody awaited does not warn at garbage collection.
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Each call while the broker is down begins a start: one warning a call (a line
            # per synchronous invocation) became one per FAILED_SAID_EVERY s, counting the rest.
            self._failures(repr(exc))

    def _tell(self, failed: str, more: int) -> None:
        shown = f" ({more} more failed starts not shown)" if more else ""
        self._log.warning("%s: %s%s", self._failed, failed, shown)
