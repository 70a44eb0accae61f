"""Helpers for the timer and queue source tests: the real NatsBus on a per-test stream, with
switches that make publishing fail as it does when the bus is unreachable or slow to answer;
and the tests of what every queue source shares (publish_message, publish_held)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from eventbus._errors import BusUnavailable
from eventbus.bus import NatsBus, NatsBusConfig
from eventbus.cloudevents import new_event
from eventbus.sources import Checkpoints, Clock, SourceContext, SourceStatus, SystemClock
from eventbus.sources._base import MAX_SET_ASIDE
from eventbus.sources._queues import publish_held, publish_message
from tests.fixtures.nats import unique_name
from tests.sources._harness import WAIT, dead_letters, source_pool


class BusTap:
    """Publishes into a real bus and reads back what is on it.

    ``down = True`` refuses publishes with BusUnavailable (counted in ``refused``); ``published``
    counts publish calls the bus accepted, so a test can tell a duplicate publish from one the
    bus deduplicated. ``acks_lost = n``: the next ``n`` publishes reach the bus, then fail with
    BusUnavailable, as when its acknowledgement did not arrive in time.
    """

    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus
        self.down = False
        self.acks_lost = 0
        self.refused = 0
        self.published = 0
        self._changed = asyncio.Condition()
        self._messages = bus.messages()

    async def close(self) -> None:
        """Stop reading before the bus closes, so closing does not wait on our subscription."""
        await self._messages.aclose()

    async def publish(self, event: dict[str, Any], *, via: str = "test") -> None:
        if self.down:
            self.refused += 1
            async with self._changed:
                self._changed.notify_all()
            raise BusUnavailable("bus is down (test)")
        await self.bus.publish(event, via=via)
        self.published += 1
        async with self._changed:
            self._changed.notify_all()
        if self.acks_lost:
            self.acks_lost -= 1
            raise BusUnavailable("no acknowledgement in time (test)")

    async def wait_refused(self, count: int = 1) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: self.refused >= count)

    async def wait_published(self, count: int) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: self.published >= count)

    async def take(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` events on the bus, acknowledged (bounded by WAIT)."""
        events = []
        async with asyncio.timeout(WAIT):
            for _ in range(count):
                message = await anext(self._messages)
                await message.ack()
                events.append(message.event)
        return events


@contextlib.asynccontextmanager
async def bus_tap(nats_url: str) -> AsyncIterator[BusTap]:
    config = NatsBusConfig(
        url=nats_url,
        stream=unique_name("SRC"),
        subject=unique_name("src"),
        durable=unique_name("reader"),
    )
    async with NatsBus(config) as bus:
        tap = BusTap(bus)
        try:
            yield tap
        finally:
            await tap.close()


def context(
    pool: asyncpg.Pool,
    name: str,
    tap: BusTap,
    *,
    type: str,
    clock: Clock | None = None,
    instance_id: str = "instance-a",
) -> SourceContext:
    return SourceContext(
        name=name,
        publish=tap.publish,
        pool=pool,
        checkpoints=Checkpoints(pool, name),
        status=SourceStatus(name=name, type=type),
        clock=clock or SystemClock(),
        instance_id=instance_id,
    )


async def test_a_message_its_reading_fails_on_is_dead_lettered(
    database_dsn: str, nats_url: str
) -> None:
    # Not refused by the binding (CloudEventError) but failed on: it raised out of the source,
    # which restarted on the same message for ever.
    def fails() -> list[dict[str, Any]]:
        raise ValueError("year 14645 is out of range")

    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "q", tap, type="kafka")
        assert not await publish_message(ctx, b"payload", fails, {"offset": 7})
        [row] = await dead_letters(pool, "q")
        assert row["payload"] == b"payload"
        assert row["error"] == "cannot read the message: ValueError('year 14645 is out of range')"


async def test_a_message_too_large_for_the_bus_is_dead_lettered(
    database_dsn: str, nats_url: str
) -> None:
    # Allowed by max_event_size, over the NATS server's max_payload (1 MiB): the bus refused
    # it each time, and the source reconnected and was handed the same message for ever.
    payload = b"x" * 2_000_000

    def convert() -> list[dict[str, Any]]:
        event = new_event(type="t", source="/q", data=payload.decode(), max_size=4 << 20)
        return [event, new_event(type="t", source="/q", data="small")]

    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "q", tap, type="kafka")
        assert not await publish_message(ctx, payload, convert, {"offset": 9})
        [row] = await dead_letters(pool, "q")
        assert row["error"].startswith("the event takes") and "max_payload" in row["error"]
        assert len(row["payload"]) == MAX_SET_ASIDE
        assert tap.published == 0 and ctx.status.errors == 1


async def test_a_retried_publish_carries_the_events_the_first_try_made(
    database_dsn: str, nats_url: str
) -> None:
    # A message without an id of its own (raw MQTT, core NATS) was converted again on each
    # try, with a fresh random id: a publish stored by the bus but not acknowledged in time,
    # then retried, reached the targets twice under two ids.
    def convert() -> list[dict[str, Any]]:
        return [new_event(type="t", source="/q", data="once")]

    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "q", tap, type="mqtt")
        tap.acks_lost = 1
        assert await publish_held(ctx, b"once", convert, {"topic": "a"})
        assert tap.published == 2  # tried twice, taken both times
        await tap.publish(new_event(type="t", source="/q", data="after"))
        events = await tap.take(2)
        assert [e["data"] for e in events] == ["once", "after"]  # the retry was a duplicate
