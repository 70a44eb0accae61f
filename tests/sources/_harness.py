"""Helpers for the source tests (engineer A's): a migrated pool, a recording publish seam, and a
source running in a task (and, re-exported, the suite's one polling helper, ``eventually``).
Not collected by pytest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from eventbus._errors import BusUnavailable
from eventbus.sources import Checkpoints, Clock, Source, SourceContext, SourceStatus, SystemClock
from eventbus.store._migrate import migrate
from tests.fixtures.wait import eventually as eventually  # the source tests' one poll


@contextlib.asynccontextmanager
async def source_pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh test database with every migration applied."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        yield pool
    finally:
        await pool.close()


# Upper bound on any wait for a condition; conditions normally hold within milliseconds.
WAIT = 10.0


class Recorder:
    """The publish seam: keeps events in order; ``down = True`` makes publish raise
    BusUnavailable the way the real bus does when NATS is unreachable."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.down = False
        self.refused = 0
        self._changed = asyncio.Condition()

    async def publish(self, event: dict[str, Any]) -> None:
        if self.down:
            self.refused += 1
            async with self._changed:
                self._changed.notify_all()
            raise BusUnavailable("bus is down (test)")
        self.events.append(event)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events were published; return them all."""
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: len(self.events) >= count)
        return self.events

    async def wait_refused(self, count: int = 1) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: self.refused >= count)


def make_context(
    pool: asyncpg.Pool, name: str, recorder: Recorder, clock: Clock | None = None
) -> SourceContext:
    return SourceContext(
        name=name,
        publish=recorder.publish,
        pool=pool,
        checkpoints=Checkpoints(pool, name),
        status=SourceStatus(name=name, type="test"),
        clock=clock or SystemClock(),
    )


@contextlib.asynccontextmanager
async def running(source: Source, ctx: SourceContext) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``source`` in a task for the duration of the block, then cancel it (a crash)."""
    task = asyncio.create_task(source.run(ctx))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def dead_letters(pool: asyncpg.Pool, source: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT payload, error, meta::text AS meta FROM source_dead_letters"
        " WHERE source = $1 ORDER BY id",
        source,
    )
