"""Helpers for the source tests (engineer A's): a migrated pool, a recording publish seam, a
source running in a task, and a clock moved by hand. Not collected by pytest."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from eventbus._errors import BusUnavailable
from eventbus.sources import (
    Checkpoints,
    Clock,
    Source,
    SourceContext,
    SourceStatus,
    SystemClock,
    build_source,
)
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


@contextlib.asynccontextmanager
async def started(
    dsn: str, spec: dict[str, Any], recorder: Recorder
) -> AsyncIterator[SourceContext]:
    """The source ``spec`` describes, running on ``dsn``'s database and publishing to
    ``recorder``, for the duration of the block; yields its context."""
    async with source_pool(dsn) as pool:
        ctx = make_context(pool, spec["name"], recorder)
        async with running(build_source(spec), ctx):
            yield ctx


def failing_with(ctx: SourceContext, fragment: str) -> Callable[[], Awaitable[bool]]:
    """For ``eventually``: the source backs off with ``fragment`` in its last error."""

    async def check() -> bool:
        return ctx.status.state == "backoff" and fragment in (ctx.status.last_error or "")

    return check


async def dead_letters(pool: asyncpg.Pool, source: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT payload, error, meta::text AS meta FROM source_dead_letters"
        " WHERE source = $1 ORDER BY id",
        source,
    )


class ManualClock:
    """A clock that only moves when told to, so timing logic is tested without real sleeps.

    ``sleep`` blocks until :meth:`advance` moves the clock past its deadline; sleepers wake in
    deadline order.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._slept = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    @property
    def sleepers(self) -> int:
        """How many ``sleep`` calls are waiting right now."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + timedelta(seconds=max(seconds, 0.0))
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        self._slept.set()
        await fut

    def advance(self, seconds: float) -> None:
        """Move the clock forward and wake every sleeper whose deadline has passed."""
        self._now += timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def suspend(self, seconds: float) -> None:
        """The machine suspended for ``seconds``: the wall clock moves on, and every sleep
        under way (on the monotonic clock, which stands still meanwhile) ends that much later."""
        shift = timedelta(seconds=seconds)
        self._now += shift
        self._sleepers = [(deadline + shift, n, fut) for deadline, n, fut in self._sleepers]

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Return once at least ``count`` sleepers are waiting (wrap in ``asyncio.timeout``)."""
        while self.sleepers < count:
            self._slept.clear()
            await self._slept.wait()
