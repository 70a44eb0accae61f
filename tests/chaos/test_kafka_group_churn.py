"""The Kafka bus while its consumer group changes under a stream: members join, leave, and
one is stopped while its join is still in progress (a shutdown or a reload at the wrong
moment). Real broker (Tansu), real consumers; what is reconciled is the bus's own ledger:
every event published is acknowledged by some member, and no offset of any partition was
skipped by every member (an offset nobody handed out is an event lost on the consuming side).
Redeliveries are allowed (at least once): each is counted, and bounded by what the members
had in flight when the partitions moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter, defaultdict

import pytest
from aiokafka import AIOKafkaProducer

from eventbus.bus import BusMessage, KafkaBus, KafkaBusConfig
from eventbus.bus._base import wire_encode
from tests.bus.conftest import event, kafka_config
from tests.fixtures.wait import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EVENTS = 6000
RATE = 500.0  # events/s published
MAX_IN_FLIGHT = 100  # per member
_HEADERS = [("content-type", b"application/cloudevents+json")]


class _Member:
    """One group member handling its messages concurrently (a little work each, some nak'd
    once), as the router does; ``stop`` cancels it like a shutdown does."""

    def __init__(self, name: str, config: KafkaBusConfig, ledger: _Ledger) -> None:
        self.name = name
        self._config = config
        self._ledger = ledger
        self._handlers: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._run(), name=f"member-{name}")

    async def _run(self) -> None:
        async with KafkaBus(self._config) as bus:
            async for msg in bus.messages():
                handler = asyncio.create_task(self._handle(msg))
                self._handlers.add(handler)
                handler.add_done_callback(self._handlers.discard)

    async def _handle(self, msg: BusMessage) -> None:
        self._ledger.handed_out(msg, self.name)
        await asyncio.sleep(random.uniform(0, 0.02))
        if msg.deliveries == 1 and random.random() < 0.02:
            await msg.nak(0.05)
            return
        self._ledger.acked[msg.event["id"]] += 1
        await msg.ack()

    async def stop(self) -> None:
        """Stop consuming at once; the messages being handled finish (their acks no longer
        reach the broker: the next owner of their partition redelivers them)."""
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task
        await asyncio.gather(*self._handlers)


class _Ledger:
    def __init__(self) -> None:
        self.acked: Counter[str] = Counter()
        self.offsets: dict[int, set[int]] = defaultdict(set)
        self.by_member: Counter[str] = Counter()

    def handed_out(self, msg: BusMessage, member: str) -> None:
        self.by_member[member] += 1
        # ref: kafka:<topic>:<partition>:<offset>:<timestamp>
        _, _, partition, offset, _ = msg.ref.rsplit(":", 4)
        self.offsets[int(partition)].add(int(offset))


async def test_members_join_and_leave_mid_stream(kafka_bootstrap: str) -> None:
    random.seed(7)
    config = kafka_config(
        kafka_bootstrap,
        partitions=6,
        session_timeout=2.0,
        commit_interval=0.5,
        max_in_flight=MAX_IN_FLIGHT,
        fetch_wait=0.01,
    )
    ledger = _Ledger()
    members: dict[str, _Member] = {}
    plan = [  # (seconds into the stream, what happens): about 1 s apart at least, for a
        # join on Tansu takes about half the session timeout
        (2.0, "join b"),
        (4.0, "join c"),
        (5.5, "leave a"),
        (7.0, "join d"),
        (7.2, "leave d"),  # d is still joining: stopped in the middle of its join
        (8.0, "join e"),
        (9.5, "leave b"),
        (10.5, "join f"),
        (11.5, "leave c"),
    ]
    async with KafkaBus(config) as publisher:
        members["a"] = _Member("a", config, ledger)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for sent in range(0, EVENTS, 50):
            while plan and plan[0][0] * RATE <= sent:
                what, name = plan.pop(0)[1].split()
                if what == "join":
                    members[name] = _Member(name, config, ledger)
                else:
                    await members.pop(name).stop()
            outcomes = await publisher.publish_many([event(n) for n in range(sent, sent + 50)])
            assert outcomes == [None] * 50, outcomes
            await asyncio.sleep(max(0.0, began + (sent + 50) / RATE - loop.time()))
        try:
            await eventually(
                lambda: len(ledger.acked) == EVENTS,
                within=60,
                every=0.2,
                what=f"all {EVENTS} events acknowledged",
            )
        finally:
            for member in members.values():
                await member.stop()
            again = sum(ledger.acked.values()) - len(ledger.acked)
            print(f"acked {len(ledger.acked)} of {EVENTS}, {again} more than once; by member")
            print(f"(messages handed out) {dict(ledger.by_member)}")
    for partition, offsets in sorted(ledger.offsets.items()):
        skipped = set(range(max(offsets) + 1)) - offsets
        assert not skipped, f"partition {partition}: offsets {sorted(skipped)} never handed out"
    assert sum(len(o) for o in ledger.offsets.values()) == EVENTS
    assert len(ledger.by_member) >= 3, f"the partitions hardly moved: {ledger.by_member}"
    # Redeliveries: a member cancelled mid-stream leaves at most what it had in flight, and a
    # rebalance whose commit fails leaves at most what was acked since the last commit (one
    # commit interval's worth); every other move waits for the messages being handled.
    again = sum(ledger.acked.values()) - EVENTS
    leaves, steps = 4, 9
    assert again <= leaves * MAX_IN_FLIGHT + steps * RATE * config.commit_interval, again


async def test_producers_racing_on_one_partition(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Several eventbus processes publish to the same partitions at once. Tansu may then answer
    # a fetch with a later batch while an earlier one, from another producer, is not readable
    # yet; a consumer that moved on from there would never hand those events out (the bench
    # lost 4 events that way). The bus reads the partition again from the gap.
    caplog.set_level("INFO", logger="eventbus.bus")
    config = kafka_config(kafka_bootstrap, partitions=1, fetch_wait=0.01, max_in_flight=1000)
    producers, each, concurrency = 4, 15000, 32
    ledger = _Ledger()
    async with KafkaBus(config) as bus:

        async def consume() -> None:
            async for msg in bus.messages():
                ledger.handed_out(msg, "only")
                ledger.acked[msg.event["id"]] += 1
                await msg.ack()

        consuming = asyncio.create_task(consume())
        # One event first, so the consumer reads from offset 0 before the race begins. (At a
        # new partition's very first offsets Tansu's answer to "where does the log begin" can
        # itself skip the batch not readable yet: not reliably covered, see docs/bus.md.)
        total = producers * each + 1
        await bus.publish(event(total - 1))
        await eventually(lambda: ledger.acked, within=30, what="the first event handed out")

        async def produce(p: int) -> None:
            # aiokafka's own producer, as fast as it goes, writing what the bus writes: the
            # race needs produce requests from several connections overlapping
            producer = AIOKafkaProducer(
                bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=False
            )
            await producer.start()
            numbers = iter(range(p * each, (p + 1) * each))

            async def sender() -> None:
                for n in numbers:  # shared: each number is taken once
                    payload, key = wire_encode(event(n))
                    await producer.send_and_wait(
                        config.topic, payload, key=key.encode(), headers=_HEADERS
                    )

            try:
                await asyncio.gather(*(sender() for _ in range(concurrency)))
            finally:
                await producer.stop()

        try:
            await asyncio.gather(*(produce(p) for p in range(producers)))
            await eventually(
                lambda: len(ledger.acked) == total, within=60, every=0.2, what="all handed out"
            )
        finally:
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
            rereads = caplog.text.count("reading again from")
            print(f"{len(ledger.acked)} of {total} handed out; {rereads} re-reads")
    (offsets,) = ledger.offsets.values()
    skipped = sorted(set(range(total)) - offsets)
    reads = [line for line in caplog.text.splitlines() if "partition 0:" in line]
    assert not skipped, f"offsets {skipped[0]}-{skipped[-1]} never handed out; {reads}"
    assert sum(ledger.acked.values()) == total, "a re-read handed something out twice"
    assert "never handed out" not in caplog.text
