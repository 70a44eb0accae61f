"""The Bus contract, run against every backend (JetStream and Kafka) on real brokers: the shared
session ones, and one of the test's own where the broker goes down (``own_broker``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from eventbus._errors import BusError, BusUnavailable, EventTooLargeForBus
from eventbus.bus import DUPLICATE, BusMessage, NatsBusConfig, open_bus
from tests.bus.conftest import PATIENCE, MakeConfig, OwnBroker, event, take, take_until
from tests.fixtures.wait import eventually


async def test_publish_consume_ack(make_config: MakeConfig) -> None:
    async with open_bus(make_config()) as bus:
        await bus.publish(event(0))
        assert await bus.publish_many([event(n) for n in range(1, 20)]) == [None] * 19
        messages = bus.messages()
        got = await take(messages, 20)
        assert sorted(m.event["data"]["n"] for m in got) == list(range(20))
        assert got[0].event == event(got[0].event["data"]["n"])
        assert {m.deliveries for m in got} == {1}
        for msg in got:
            await msg.ack()
        # Acked messages never come back: the next one handed out is the new event.
        await bus.publish(event(99))
        (after,) = await take(messages, 1)
        assert after.event["id"] == "e-99"
        await after.ack()


async def test_a_message_names_its_bus_message_and_publisher(make_config: MakeConfig) -> None:
    async with open_bus(make_config()) as bus:
        before = datetime.now(UTC) - timedelta(seconds=5)
        await bus.publish(event(1), via="http")
        await bus.publish(event(2))
        messages = bus.messages()
        # (Kafka orders per partition only)
        first, second = sorted(await take(messages, 2), key=lambda m: str(m.event["id"]))
        assert (first.via, second.via) == ("http", "bus")
        assert first.rejected is None and orjson.loads(first.payload) == event(1)
        assert before < first.published_at < datetime.now(UTC) + timedelta(seconds=5)
        assert first.ref != second.ref
        await first.nak()
        (again,) = await take(messages, 1)
        assert (again.ref, again.published_at) == (first.ref, first.published_at)
        for msg in (again, second):
            await msg.ack()


async def test_nak_redelivers(make_config: MakeConfig) -> None:
    async with open_bus(make_config()) as bus:
        await bus.publish(event(1))
        messages = bus.messages()
        (first,) = await take(messages, 1)
        await first.nak()
        (second,) = await take(messages, 1)
        assert second.event == first.event
        assert second.deliveries == 2
        await second.nak(delay=0.2)
        (third,) = await take(messages, 1)
        assert third.event == first.event
        assert third.deliveries == 3
        await third.nak(delay=-1.0)  # a negative delay means at once
        (fourth,) = await take(messages, 1)
        assert fourth.deliveries == 4
        await fourth.ack()
        await fourth.nak()  # settling twice does nothing


async def test_unacked_messages_go_to_the_next_consumer(make_config: MakeConfig) -> None:
    config = make_config()
    ids = {f"e-{n}" for n in range(10)}
    async with open_bus(config) as first:
        await first.publish_many([event(n) for n in range(10)])
        got = await take(first.messages(), 10)
        acked = {m.event["id"] for m in got[::2]}
        for msg in got[::2]:
            await msg.ack()
    # The first consumer closed holding five un-acked messages: the next one must get them.
    async with open_bus(config) as second:
        seen = await take_until(second.messages(), ids - acked)
        assert ids - acked <= {m.event["id"] for m in seen}


_HOLDER = """
import asyncio, json, sys
from eventbus.bus import KafkaBusConfig, NatsBusConfig, open_bus

kind, settings, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
config = (NatsBusConfig if kind == "NatsBusConfig" else KafkaBusConfig)(**settings)

async def main():
    async with open_bus(config) as bus:
        messages = bus.messages()
        for _ in range(n):
            await anext(messages)
        print("holding", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_killed_consumer_work_is_redelivered(make_config: MakeConfig) -> None:
    config = make_config()
    if isinstance(config, NatsBusConfig):
        config = make_config(ack_wait=1.0)
    ids = {f"e-{n}" for n in range(5)}
    async with open_bus(config) as bus:
        await bus.publish_many([event(n) for n in range(5)])
        settings = {name: getattr(config, name) for name in config.__dataclass_fields__}
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _HOLDER,
            type(config).__name__,
            json.dumps(settings),
            "5",
            stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).parents[2],
        )
        try:
            assert holder.stdout is not None
            async with asyncio.timeout(PATIENCE):
                assert await holder.stdout.readline() == b"holding\n"
        finally:
            holder.kill()
            await holder.wait()
        # The holder died with every message un-acked: this consumer must get them all.
        seen = await take_until(bus.messages(), ids)
        assert ids <= {m.event["id"] for m in seen}


async def test_two_consumers_split_the_work_and_see_everything(make_config: MakeConfig) -> None:
    config = make_config(max_in_flight=5)
    ids = {f"e-{n}" for n in range(100)}
    seen: dict[str, set[str]] = {"a": set(), "b": set()}
    b_started = asyncio.Event()
    all_seen = asyncio.Event()

    async def consume(
        name: str, messages: AsyncIterator[BusMessage], hold: asyncio.Event | None
    ) -> None:
        held: list[BusMessage] = []
        while not all_seen.is_set():
            msg = await anext(messages)
            seen[name].add(msg.event["id"])
            if name == "b":
                b_started.set()
            if seen["a"] | seen["b"] >= ids:
                all_seen.set()
            held.append(msg)
            # A fills its window and holds it un-acked until B has work, so A cannot take all.
            if hold is not None and len(held) == config.max_in_flight:
                await hold.wait()
                hold = None
            if hold is None:
                for h in held:
                    await h.ack()
                held.clear()

    async with open_bus(config) as bus_a, open_bus(config) as bus_b:
        await bus_a.publish_many([event(n) for n in range(100)])
        tasks = [
            asyncio.create_task(consume("a", bus_a.messages(), b_started)),
            asyncio.create_task(consume("b", bus_b.messages(), None)),
        ]
        try:
            async with asyncio.timeout(30):
                await all_seen.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert seen["a"] | seen["b"] == ids
    assert seen["a"] and seen["b"]


async def test_in_flight_is_bounded(make_config: MakeConfig) -> None:
    async with open_bus(make_config(max_in_flight=3)) as bus:
        await bus.publish_many([event(n) for n in range(10)])
        messages = bus.messages()
        held = await take(messages, 3)

        async def fourth_message() -> BusMessage:
            return await anext(messages)

        blocked = asyncio.create_task(fourth_message())
        # A short settle, kept on purpose: nothing marks "the bus would have handed it out by
        # now"; 0.5 s spans two of its fetch rounds (fetch/poll timeout 0.2 s, conftest.py).
        await asyncio.sleep(0.5)
        assert not blocked.done(), "a fourth message was handed out while three were un-acked"
        await held[0].ack()
        async with asyncio.timeout(30):
            fourth = await blocked
        assert fourth.event["id"] not in {m.event["id"] for m in held}
        for msg in [*held[1:], fourth]:
            await msg.ack()


async def test_publish_many_reports_each_event(make_config: MakeConfig) -> None:
    async with open_bus(make_config()) as bus:
        no_id = event(1)
        del no_id["id"]
        not_json = event(2, data={"n": 2, "bad": {1, 2}})
        results = await bus.publish_many([event(0), no_id, not_json, event(3)])
        assert results[0] is None and results[3] is None
        assert isinstance(results[1], BusError) and "'id'" in str(results[1])
        assert isinstance(results[2], BusError) and "JSON" in str(results[2])
        got = await take_until(bus.messages(), {"e-0", "e-3"})
        assert {m.event["id"] for m in got} == {"e-0", "e-3"}
        assert await bus.publish_many([]) == []


async def test_an_event_over_the_brokers_limit_is_refused_as_too_large(
    make_config: MakeConfig,
) -> None:
    # 2 MB: over the session NATS server's max_payload (its default, 1 MiB) and the Kafka
    # producer's request size for the default max_event_size (1.6 MiB). NATS had answered
    # MaxPayloadError() and Kafka MessageSizeTooLargeError as any refusal (422 at the edge).
    async with open_bus(make_config()) as bus:
        big, small = event(1, data="x" * 2_000_000), event(2)
        refused, stored = await bus.publish_many([big, small])
        assert isinstance(refused, EventTooLargeForBus), refused
        assert re.search(r"max_payload \(\d+ bytes\)|max_request_size", str(refused))
        assert stored is None
        got = await take_until(bus.messages(), {"e-2"})
        assert [m.event["id"] for m in got] == ["e-2"]


async def test_the_bus_carries_an_event_of_max_event_size(own_broker: OwnBroker) -> None:
    # max_event_size allows up to 64 MiB, and the bus took nothing over 1 MiB: binary data of
    # 1 MiB, a third larger in base64 on the bus, was refused.
    size = 1 << 20
    data = os.urandom(size - 4096)
    async with open_bus(own_broker.config(max_event_size=size)) as bus:
        big = event(1, data_base64=base64.b64encode(data).decode())
        del big["data"]
        await bus.publish(big)
        (got,) = await take_until(bus.messages(), {"e-1"})
        assert base64.b64decode(got.event["data_base64"]) == data


async def test_a_duplicate_is_reported_exactly_when_the_bus_dropped_it(
    make_config: MakeConfig,
) -> None:
    """JetStream drops a source+id it stored within its duplicate window and says so; Kafka
    keeps every copy and never says so (the outcome tells what is on the bus), and its
    consumer drops the copy instead: either way the event is handed out once."""
    config = make_config()
    async with open_bus(config) as bus:
        assert await bus.publish_many([event(1)]) == [None]
        again = await bus.publish_many(
            [event(1, data="changed"), event(1, source="/elsewhere"), event(2)]
        )
        await bus.publish(event(2))  # a duplicate is no error for the single publish either
        dropped = again[0] == DUPLICATE
        assert dropped == isinstance(config, NatsBusConfig)
        assert again[1:] == [None, None]  # another source makes another event
        messages = bus.messages()
        got = await take(messages, 3)
        copies = [(m.event["source"], m.event["id"]) for m in got]
        assert copies.count(("/tests/bus", "e-1")) == 1
        assert copies.count(("/tests/bus", "e-2")) == 1
        for msg in got:
            await msg.ack()
        # one event invoked on two targets (two scopes) is no copy: each is handed out (on
        # Kafka the second was dropped, and its target never got it, though answered 202)
        await bus.publish(event(3), scope="invoke:a")
        await bus.publish(event(3), scope="invoke:b")
        scoped = await take(messages, 2)
        assert [(m.event["id"]) for m in scoped] == ["e-3", "e-3"]
        for msg in scoped:
            await msg.ack()
        # A short settle, kept on purpose: nothing marks "no further copy is coming"; 0.5 s
        # spans two fetch rounds (fetch/poll timeout 0.2 s, conftest.py).
        extra = asyncio.ensure_future(anext(messages))
        await asyncio.sleep(0.5)
        assert not extra.done(), "a dropped duplicate was handed out"
        extra.cancel()


@pytest.mark.parametrize("bad", [None, "text", {"id": "x"}, {"source": "/s", "id": "x", "o": {1}}])
async def test_publish_rejects_bad_events_and_keeps_working(
    make_config: MakeConfig, bad: object
) -> None:
    async with open_bus(make_config()) as bus:
        with pytest.raises(BusError, match="cannot publish event"):
            await bus.publish(bad)  # type: ignore[arg-type]
        await bus.publish(event(1))
        got = await take_until(bus.messages(), {"e-1"})
        assert got[-1].event == event(1)


async def test_bus_must_be_entered(make_config: MakeConfig) -> None:
    bus = open_bus(make_config())
    with pytest.raises(BusError, match="not open"):
        await bus.publish(event(1))
    assert await bus.ping() is False


async def test_ping(make_config: MakeConfig) -> None:
    async with open_bus(make_config()) as bus:
        assert await bus.ping() is True


async def test_iteration_ends_when_the_bus_closes(make_config: MakeConfig) -> None:
    config = make_config()
    async with open_bus(config) as bus:
        await bus.publish_many([event(n) for n in range(3)])
        messages = bus.messages()
        (first,) = await take(messages, 1)
        await first.ack()
    with pytest.raises(StopAsyncIteration):
        await anext(messages)
    # The two never handed out (or handed back on close) are still there for the next consumer.
    async with open_bus(config) as bus:
        await take_until(bus.messages(), {"e-0", "e-1", "e-2"} - {first.event["id"]})


async def test_in_flight_stays_bounded_under_load(make_config: MakeConfig) -> None:
    """A consumer settling messages slowly and concurrently, as the router does behind a slow
    target, never holds more than ``max_in_flight``: however the broker batches its answers."""
    limit = 20
    linger = {"fetch_linger": 0.001} if _is_nats(make_config) else {}
    config = make_config(max_in_flight=limit, **linger)
    total = 1500
    async with open_bus(config) as bus:
        for start in range(0, total, 500):
            assert (
                await bus.publish_many([event(n) for n in range(start, start + 500)])
                == [None] * 500
            )
        held = peak = 0
        done = asyncio.Event()
        seen: set[str] = set()
        tasks: set[asyncio.Task[None]] = set()

        async def settle(msg: BusMessage) -> None:
            nonlocal held
            await asyncio.sleep(random.uniform(0, 0.004))
            held -= 1
            await msg.ack()

        async def consume() -> None:
            nonlocal held, peak
            async for msg in bus.messages():
                held += 1
                peak = max(peak, held)
                seen.add(msg.event["id"])
                task = asyncio.create_task(settle(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if len(seen) == total:
                    done.set()

        consumer = asyncio.create_task(consume())
        try:
            async with asyncio.timeout(PATIENCE * 2):
                await done.wait()
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await asyncio.gather(*tasks, return_exceptions=True)
    assert peak <= limit, f"{peak} messages held at once against a limit of {limit}"


async def test_publish_while_the_broker_is_down_fails_then_recovers(own_broker: OwnBroker) -> None:
    async with open_bus(own_broker.config(publish_timeout=1.0, connect_timeout=1.0)) as bus:
        await bus.publish(event(1))
        await own_broker.stop()
        with pytest.raises(BusUnavailable):
            await bus.publish(event(2))
        results = await bus.publish_many([event(3), event(4)])
        assert all(isinstance(r, BusUnavailable) for r in results)
        assert await bus.ping() is False

        await own_broker.start()

        async def published() -> bool:
            try:
                await bus.publish(event(5))
            except BusUnavailable:
                return False
            return True

        what = "publishing after the broker came back"
        await eventually(published, within=PATIENCE, every=0.2, what=what)
        assert await bus.ping() is True
        wanted = {"e-1", "e-5"} if own_broker.keeps_messages else {"e-5"}
        got = await take_until(bus.messages(), wanted)
        assert wanted <= {m.event["id"] for m in got}


def _is_nats(make_config: MakeConfig) -> bool:
    return isinstance(make_config(), NatsBusConfig)
