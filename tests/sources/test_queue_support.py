"""Helpers for the timer and queue source tests: the real NatsBus on a per-test stream, with
switches that make publishing fail as it does when the bus is unreachable or slow to answer;
and the tests of what every queue source shares (publish_message, publish_held)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
import orjson

from eventbus._errors import BusUnavailable, CloudEventError
from eventbus.bus import NatsBus, NatsBusConfig
from eventbus.cloudevents import new_event
from eventbus.sources import Checkpoints, Clock, SourceContext, SourceStatus, SystemClock
from eventbus.sources._base import MAX_SET_ASIDE
from eventbus.sources._queues import (
    MAX_KEPT_HEADER_VALUE,
    MAX_KEPT_HEADERS,
    Message,
    Whence,
    publish_held,
    publish_message,
    publish_messages,
)
from tests.fixtures.nats import unique_name
from tests.sources._harness import WAIT, dead_letters, source_pool


class BusTap:
    """Publishes into a real bus and reads back what is on it.

    ``down = True`` refuses publishes with BusUnavailable (counted in ``refused``); ``published``
    counts publish calls the bus accepted, so a test can tell a duplicate publish from one the
    bus deduplicated. ``acks_lost = n``: the next ``n`` publishes reach the bus, then fail with
    BusUnavailable, as when its acknowledgement did not arrive in time. ``publish_many`` is the
    batch seam (``SourceContext.publish_many``): ``calls`` keeps the size of each call. An id
    in ``refuse_once`` is refused (BusUnavailable) the first time it comes, by either.
    """

    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus
        self.down = False
        self.acks_lost = 0
        self.refused = 0
        self.published = 0
        self.calls: list[int] = []
        self.refuse_once: set[str] = set()
        self._changed = asyncio.Condition()
        self._messages = bus.messages()

    async def close(self) -> None:
        """Stop reading before the bus closes, so closing does not wait on our subscription."""
        await self._messages.aclose()

    async def publish(self, event: dict[str, Any], *, via: str = "test") -> None:
        if self.down or event["id"] in self.refuse_once:
            self.refuse_once.discard(event["id"])
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

    async def publish_many(
        self, events: Sequence[dict[str, Any]], *, via: str = "test"
    ) -> list[object]:
        self.calls.append(len(events))
        refused = BusUnavailable("bus is down (test)")
        outcomes: list[object] = [refused] * len(events)
        sent = []
        for i, event in enumerate(events):
            if self.down or event["id"] in self.refuse_once:
                self.refuse_once.discard(event["id"])
                self.refused += 1
            else:
                sent.append(i)
        stored = await self.bus.publish_many([events[i] for i in sent], via=via)
        for i, outcome in zip(sent, stored, strict=True):
            outcomes[i] = outcome
            self.published += not isinstance(outcome, BaseException)
        async with self._changed:
            self._changed.notify_all()
        return outcomes

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


async def test_a_fetched_batch_is_published_in_one_call_with_its_refusals_per_message(
    database_dsn: str, nats_url: str
) -> None:
    # A queue source's fetched batch went to the bus one message after the other's
    # acknowledgement (Kafka: one call per record, 90 µs of CPU per event against 30-40 for the
    # bus's batch publish; JetStream: a round trip per message).
    def made(*ids: str, size: int = 0) -> Callable[[], list[dict[str, Any]]]:
        def convert() -> list[dict[str, Any]]:
            data = "x" * size if size else "small"
            return [
                new_event(type="t", source="/q", id=i, data=data, max_size=4 << 20) for i in ids
            ]

        return convert

    def unreadable() -> list[dict[str, Any]]:
        raise CloudEventError("not an event (test)")

    too_large = made("big", size=2_000_000)
    messages = [
        Message(b"m0", made("a0"), {"offset": 0}),
        Message(b"m1", unreadable, {"offset": 1}),
        Message(b"m2", lambda: too_large() + made("a2")(), {"offset": 2}),
        Message(b"m3", made("a3", "b3"), {"offset": 3}),
        Message(b"m4", made("a4"), {"offset": 4}),
    ]
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "q", tap, type="kafka")
        ctx.publish_many = tap.publish_many
        tap.refuse_once = {"b3"}
        outcomes = await publish_messages(ctx, messages)
        assert tap.calls == [6]  # every event the batch made, in one call
        assert [type(o).__name__ for o in outcomes] == ["NoneType"] * 3 + [
            "BusUnavailable",
            "NoneType",
        ]
        rows = await dead_letters(pool, "q")
        assert sorted((r["payload"][:2], r["error"][:12]) for r in rows) == [
            (b"m1", "not an event"),
            (b"m2", "the event ta"),
        ]
        # counted: what is on the bus (a0, a2, a3, a4), not the refused one
        assert (ctx.status.events, ctx.status.errors) == (4, 2)
        on_bus = sorted(e["id"] for e in await tap.take(4))
    assert on_bus == ["a0", "a2", "a3", "a4"]


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


def test_a_dead_letters_headers_are_kept_bounded_and_rendered_only_when_read() -> None:
    class Counted(list[tuple[str, Any]]):
        reads = 0

        def __iter__(self) -> Any:
            Counted.reads += 1
            return super().__iter__()

    headers = Counted(
        [(f"h{i}", "v" * (MAX_KEPT_HEADER_VALUE + 1 if i == 0 else 1)) for i in range(70)]
    )
    headers[1] = ("big", 2**70)  # no JSON number holds it
    meta = Whence({"topic": "t"}, headers, key=b"k")
    assert Counted.reads == 0  # a message that becomes an event pays for no rendering
    kept = dict(meta)
    assert Counted.reads == 1 and dict(meta) == kept  # once
    assert kept["topic"] == "t" and kept["key"] == {"value": "k"}
    assert kept["headers_kept"] == f"{MAX_KEPT_HEADERS} of 70"
    assert len(kept["headers"]) == MAX_KEPT_HEADERS
    first, second = kept["headers"][:2]
    assert first == {"name": "h0", "value": "v" * MAX_KEPT_HEADER_VALUE, "truncated": True}
    assert second == {"name": "big", "value": str(2**70)}
    assert orjson.loads(orjson.dumps(kept)) == kept
    assert dict(Whence({"queue": "q"})) == {"queue": "q"}  # no headers, no key: as given
