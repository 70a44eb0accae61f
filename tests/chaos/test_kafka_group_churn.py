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
import random
from collections import Counter, defaultdict

import pytest

from eventbus.bus import BusMessage, KafkaBus, KafkaBusConfig
from tests.bus.conftest import event, kafka_config
from tests.fixtures.wait import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EVENTS = 6000
RATE = 500.0  # events/s published
MAX_IN_FLIGHT = 100  # per member


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
