"""Kafka-specific behaviour: record layout, offset tracking, malformed records (a broker
outage is in the bus contract, test_contract.py)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka import errors as kerr
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

from eventbus._errors import BusError, BusUnavailable, ConfigError
from eventbus.bus import KafkaBus, KafkaBusConfig, open_bus
from eventbus.bus import _kafka as kafka_module
from eventbus.bus._base import DIRECT
from eventbus.bus._kafka import (
    GAP_PATIENCE,
    MAX_REREADS,
    _Partition,
    _Recent,
    bus_partition,
    resume_point,
)
from eventbus.bus._nats_server import free_port
from eventbus.cloudevents import encode, event_key
from tests.bus.conftest import PATIENCE, event, kafka_config, take
from tests.fixtures.kafka import TansuBroker
from tests.fixtures.wait import eventually, frozen


def test_commit_point_is_the_lowest_unacked_offset() -> None:
    part = _Partition()
    assert part.commit_point() is None
    for offset in range(10, 15):
        part.fetched(offset)
    assert part.commit_point() == 10
    part.acked.update({11, 12, 14})
    assert part.commit_point() == 10
    part.acked.add(10)
    assert part.commit_point() == 13
    part.acked.add(13)
    assert part.commit_point() == 15
    assert not part.pending and not part.acked


def test_a_gap_in_the_offsets_is_read_again_for_a_while_then_taken() -> None:
    part = _Partition()
    assert part.gap_before(40) == 0  # nothing expected yet
    part.fetched(40)
    part.fetched(41)
    assert part.gap_before(42) == 0
    assert part.gap_before(45) == 3  # 42, 43 and 44 not handed out
    # at least MAX_REREADS times, and for at least GAP_PATIENCE seconds
    assert all(part.read_again(100.0) for _ in range(MAX_REREADS))
    assert part.read_again(100.0 + GAP_PATIENCE / 2)
    assert not part.read_again(100.0 + GAP_PATIENCE)
    part.fetched(42)  # it came on a later read after all
    assert part.gap_before(46) == 3
    assert part.read_again(200.0), "a new gap gets its own re-reads"
    assert part.commit_point() == 40


@pytest.mark.parametrize(
    ("committed", "log_start", "expected"),
    [
        (None, 0, (0, None)),  # nothing committed: from the log's start
        (-1, 7, (7, None)),
        (12, 7, (12, None)),  # the commit, still held
        (7, 7, (7, None)),
        (3, 7, (7, (3, 6))),  # retention deleted 3-6 before the group read them
        (12, None, (12, None)),  # the broker did not say
        (None, None, (None, None)),
    ],
)
def test_where_a_group_resumes_and_what_retention_took(
    committed: int | None, log_start: int | None, expected: tuple[Any, Any]
) -> None:
    assert resume_point(committed, log_start) == expected


async def test_record_layout(kafka_bootstrap: str) -> None:
    config = kafka_config(kafka_bootstrap)
    sent = [event(1), event(1), *(event(n) for n in range(2, 10))]
    async with open_bus(config) as bus:
        for e in sent:
            await bus.publish(e)
    reader = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    await reader.start()
    try:
        partitions = [TopicPartition(config.topic, p) for p in range(config.partitions)]
        reader.assign(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(PATIENCE):
            while len(records) < len(sent):
                for batch in (await reader.getmany(timeout_ms=200)).values():
                    records.extend(batch)
    finally:
        await reader.stop()
    by_key = {event_key(e).encode(): e for e in sent}
    assert sorted(r.key for r in records) == sorted(event_key(e).encode() for e in sent)
    numbers = list(range(config.partitions))
    for record in records:
        assert record.key is not None
        assert record.value == encode(by_key[record.key])
        assert ("content-type", b"application/cloudevents+json") in list(record.headers)
        # The partition follows from the key alone (the bus's own partitioner, not murmur2).
        assert record.partition == bus_partition(record.key, numbers, numbers)
    assert len({r.partition for r in records}) > 1, "ten keys spread over the partitions"


def test_bus_partition_is_stable_and_spread() -> None:
    numbers = list(range(8))
    keys = [f"https://example.com/source{n}".encode() for n in range(4000)]
    chosen = [bus_partition(k, numbers, numbers) for k in keys]
    assert chosen == [bus_partition(k, numbers, numbers) for k in keys]
    counts = [chosen.count(p) for p in numbers]
    assert min(counts) > 400, counts  # 500 each on average
    assert bus_partition(None, numbers, [3]) == 3  # no key: one of the available ones


async def test_offsets_are_committed_only_up_to_the_lowest_unacked(kafka_bootstrap: str) -> None:
    config = kafka_config(kafka_bootstrap, partitions=1)
    async with open_bus(config) as first:
        for n in range(6):
            await first.publish(event(n))
        got = await take(first.messages(), 6)
        assert [m.event["id"] for m in got] == [f"e-{n}" for n in range(6)]
        for n in (0, 1, 3, 4):
            await got[n].ack()
    async with open_bus(config) as second:
        again = await take(second.messages(), 4)
        assert [m.event["id"] for m in again] == ["e-2", "e-3", "e-4", "e-5"]


async def test_records_that_are_not_cloudevents_are_handed_out_rejected(
    kafka_bootstrap: str,
) -> None:
    config = kafka_config(kafka_bootstrap, partitions=1)
    async with open_bus(config) as bus:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(config.topic, b"not json")
            await producer.send_and_wait(config.topic, None, key=b"tombstone")
            await producer.send_and_wait(config.topic, b'{"id": "x", "source": "s"}')
        finally:
            await producer.stop()
        await bus.publish(event(1), via="http")
        got = await take(bus.messages(), 4)
        assert [m.payload for m in got[:3]] == [b"not json", b"", b'{"id": "x", "source": "s"}']
        assert all(m.rejected and m.event == {} for m in got[:3])
        assert "malformed JSON" in (got[0].rejected or "")
        assert "specversion" in (got[2].rejected or "")
        assert [m.via for m in got] == ["bus", "bus", "bus", "http"]
        assert got[3].rejected is None and got[3].event == event(1)
        assert len({m.ref for m in got}) == 4
        for msg in got:
            await msg.ack()


async def test_connect_to_nothing_is_unavailable() -> None:
    config = KafkaBusConfig(
        bootstrap_servers=f"127.0.0.1:{free_port()}", partitions=1, connect_timeout=1.0
    )
    with pytest.raises(BusUnavailable):
        async with KafkaBus(config):
            pass


async def test_unparsable_bootstrap_servers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bootstrap_servers"):
        async with KafkaBus(KafkaBusConfig(bootstrap_servers="127.0.0.1:port", partitions=1)):
            pass


@pytest.mark.parametrize("field", ["fetch_wait", "poll_timeout", "commit_interval"])
def test_non_positive_durations_are_config_errors(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        KafkaBusConfig(bootstrap_servers="127.0.0.1:9092", partitions=1, **{field: 0})


async def test_assignments_are_logged(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Which worker reads which partitions is what an operator needs when events stall or come
    # twice: each member logs what it was given. (On Tansu, the test broker, a second member's
    # join completes without the first rejoining, so the first is not asked to give anything
    # up: the revocation line, with the offsets the next owner reads from, is not seen here.)
    caplog.set_level("INFO", logger="eventbus.bus")
    config = kafka_config(kafka_bootstrap, partitions=2)
    async with open_bus(config) as first:
        await first.publish(event(1))
        [got] = await take(first.messages(), 1)
        await got.ack()
        async with open_bus(config) as second:
            consuming = asyncio.create_task(anext(second.messages()))
            try:
                await eventually(
                    lambda: caplog.text.count(f"of {config.topic} assigned") >= 2,
                    within=PATIENCE,
                    what="both members' assignments logged",
                )
            finally:
                consuming.cancel()
    assert f"Kafka rebalance: partitions [0, 1] of {config.topic} assigned" in caplog.text


async def test_a_consumer_cancelled_while_joining_leaves_the_group(kafka_bootstrap: str) -> None:
    # Joining waits for the group (Tansu holds each join for about half the session timeout),
    # and a shutdown or a reload can come in that wait. The consumer must not live on after
    # it: a member nobody reads from keeps heartbeating and holds the partitions it is given,
    # and their events wait until the process exits.
    config = kafka_config(kafka_bootstrap, partitions=2, session_timeout=4.0)
    async with open_bus(config) as bus:
        running = asyncio.all_tasks()
        joining = asyncio.create_task(anext(bus.messages()))
        await asyncio.sleep(0.5)
        assert not joining.done(), "the join did not wait: nothing to cancel in the middle of"
        joining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joining
        left = {t.get_name() for t in asyncio.all_tasks() - running if not t.done()}
        assert not left, f"the cancelled consumer left tasks running: {sorted(left)}"
        # and the group's work goes to whoever joins next
        await bus.publish_many([event(n) for n in range(20)])
        got = await take(bus.messages(), 20)
        assert {m.event["id"] for m in got} == {f"e-{n}" for n in range(20)}


async def test_closing_the_bus_ends_a_join_in_progress(kafka_bootstrap: str) -> None:
    # The bus closed by another task (the service stopping) while a consumer still joins:
    # the join ends with the bus, with an error saying so, and nothing of it runs on.
    config = kafka_config(kafka_bootstrap, partitions=2, session_timeout=4.0)
    running = asyncio.all_tasks()
    async with open_bus(config) as bus:
        joining = asyncio.create_task(anext(bus.messages()))
        await asyncio.sleep(0.5)
        assert not joining.done(), "the join did not wait: nothing to end in the middle of"
    async with asyncio.timeout(PATIENCE):
        with pytest.raises(BusError, match="closed while its consumer was joining"):
            await joining
    left = {t.get_name() for t in asyncio.all_tasks() - running if not t.done()}
    assert not left, f"the closed bus left tasks running: {sorted(left)}"


@pytest.mark.parametrize(
    "odd",
    [
        {"headers": [("eventbus-via", None)]},  # a header without a value
        {"timestamp_ms": 2**62},  # no date is that far: year 146 million
    ],
    ids=["header-without-value", "timestamp-out-of-range"],
)
async def test_a_record_with_odd_metadata_is_routed_like_any_other(
    kafka_bootstrap: str, odd: dict[str, Any]
) -> None:
    # Any producer can write such a record; building its message raised out of the consumer,
    # and every new consumer read it again from the commit: routing stopped for good.
    config = kafka_config(kafka_bootstrap, partitions=1)
    async with open_bus(config) as bus:
        await bus.publish(event(0))
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(config.topic, encode(event(1)), **odd)
        finally:
            await producer.stop()
        await bus.publish(event(2))
        got = await take(bus.messages(), 3)
        assert [m.event["id"] for m in got] == ["e-0", "e-1", "e-2"]
        assert [m.rejected for m in got] == [None, None, None]
        assert got[1].via == DIRECT
        for msg in got:
            await msg.ack()


async def test_a_full_window_still_polls_so_the_member_keeps_its_events(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With every slot of the in-flight window taken (slow functions, a database outage), the
    # consumer fetches nothing; aiokafka takes a member that has not polled for
    # max_poll_interval_ms (300 s; 2 s here) as gone and leaves the group, and the events
    # still being handled were handed out again once acked.
    class ShortPollInterval(AIOKafkaConsumer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, max_poll_interval_ms=2000, **kwargs)

    monkeypatch.setattr("eventbus.bus._kafka.AIOKafkaConsumer", ShortPollInterval)
    config = kafka_config(kafka_bootstrap, partitions=1, max_in_flight=2, revoke_wait=0.5)
    async with open_bus(config) as bus:
        await bus.publish_many([event(n) for n in range(3)])
        messages = bus.messages()
        first = await take(messages, 2)
        waiting = asyncio.create_task(anext(messages))  # the loop runs on, the window full
        await asyncio.sleep(5)  # handlers slower than the poll interval
        assert not waiting.done()
        for msg in first:
            await msg.ack()
        async with asyncio.timeout(PATIENCE):
            third = await waiting
        assert (third.event["id"], third.deliveries) == ("e-2", 1)
        await third.ack()
        with pytest.raises(TimeoutError):  # and nothing handed out again
            async with asyncio.timeout(2):
                await anext(messages)


async def test_closing_while_the_broker_is_down_is_bounded(tansu_binary: str) -> None:
    # Acks not committed yet, then the broker gone: the close's commit retried without end,
    # and the consumer's tasks were never stopped.
    broker = TansuBroker(tansu_binary)
    broker.start()
    try:
        config = kafka_config(broker.bootstrap, partitions=1, commit_interval=60.0)
        running = asyncio.all_tasks()
        bus = KafkaBus(config)
        await bus.__aenter__()
        try:
            await bus.publish(event(1))
            [msg] = await take(bus.messages(), 1)
            await msg.ack()
        finally:
            broker.stop()
            async with asyncio.timeout(4 * config.connect_timeout):
                await bus.__aexit__(None, None, None)
        left = [t for t in asyncio.all_tasks() - running if not t.done()]
        # aiokafka 0.14's consumer.stop() fails on a fetch it cancelled while that fetch waits
        # to retry the dead broker, before it closes its client: the client's metadata task
        # is the one thing left (eventbus/bus/_kafka.py, _stop_consumer).
        for task in left:
            task.cancel()
        names = [getattr(t.get_coro(), "__qualname__", "?") for t in left]
        assert set(names) <= {"AIOKafkaClient._md_synchronizer"}, names
    finally:
        broker.stop()


async def test_a_batch_that_waits_past_its_deadline_reports_every_event(
    tansu_binary: str,
) -> None:
    # One deadline bounds a batch's sends: with the broker frozen the producer's buffer fills
    # and a send waits for room; that event and every one after it are reported unavailable,
    # none raised, and the call returns soon after the deadline.
    broker = TansuBroker(tansu_binary)
    broker.start()
    try:
        config = kafka_config(broker.bootstrap, partitions=1, publish_timeout=1.0)
        async with open_bus(config) as bus:
            await bus.publish(event(0))
            async with frozen(broker.pid):
                batch = [event(n, data="x" * 4096) for n in range(1, 200)]
                async with asyncio.timeout(10):
                    results = await bus.publish_many(batch)
        assert len(results) == len(batch)
        assert all(isinstance(r, BusUnavailable) for r in results), {
            type(r).__name__ for r in results
        }
    finally:
        broker.stop()


async def test_offset_commits_failing_for_a_while_say_the_bus_is_stalled(
    tansu_binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every commit failed for minutes after a broker restart while readiness stayed green (a
    # broker answered); the partitions' next owner then read everything since the last commit.
    # Here the broker is frozen: each commit times out.
    monkeypatch.setattr(kafka_module, "COMMITS_STALL_AFTER", 0.5)
    broker = TansuBroker(tansu_binary)
    broker.start()
    try:
        config = kafka_config(broker.bootstrap, partitions=1, connect_timeout=1.0)
        bus = KafkaBus(config)
        await bus.__aenter__()
        reading = aiter(bus.messages())  # the group's member, as long as it is read
        try:
            await bus.publish(event(1))
            await bus.publish(event(2))
            first, second = await anext(reading), await anext(reading)
            await first.ack()
            await eventually(lambda: bus.stalled() is None, what="a commit that worked")
            async with frozen(broker.pid):
                await second.ack()

                def stalled() -> str | None:
                    return bus.stalled()

                why = await eventually(stalled, within=20, what="the commits reported failing")
                assert why.startswith("offset commits failing for "), why
                assert "TimeoutError" in why, why
            # a commit that works (or nothing left to commit) ends it
            await eventually(lambda: bus.stalled() is None, within=30, what="commits again")
        finally:
            await reading.aclose()
            async with asyncio.timeout(4 * config.connect_timeout):
                await bus.__aexit__(None, None, None)
    finally:
        broker.stop()


def test_an_error_the_library_marks_retriable_or_unknown_is_unavailability() -> None:
    # UnknownError on a publish was answered 422: a publisher following the docs dropped it
    for exc in (kerr.UnknownError(), kerr.KafkaStorageError(), kerr.NotCoordinatorError()):
        assert isinstance(kafka_module._translate(exc, "publish"), BusUnavailable), exc
    assert not isinstance(
        kafka_module._translate(kerr.TopicAuthorizationFailedError(), "publish"), BusUnavailable
    )


async def _produce_unreadable(bootstrap: str, topic: str, value: bytes, flaw: str) -> None:
    """One record aiokafka cannot read, written as raw bytes to partition 0: ``header-name``,
    a header name that is not UTF-8 (any Kafka client writes strings there, a hostile one need
    not), with a valid checksum; ``checksum``, a batch whose checksum does not match."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    builder.append(0, timestamp=None, key=None, value=value, headers=[("éé", b"x")])
    batch = builder.build()
    at = batch.find("éé".encode())
    batch[at : at + 4] = b"\xff\xfe\xff\xfe"
    crc = calc_crc32c(bytes(batch[21:]))  # over the attributes on
    struct.pack_into(">I", batch, 17, crc if flaw == "header-name" else crc ^ 1)
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        (broker,) = client.cluster.brokers()
        request = ProduceRequest(None, -1, 5000, [(topic, [(0, bytes(batch))])])
        await client.send(broker.nodeId, request)
    finally:
        await client.close()


@pytest.mark.parametrize("flaw", ["header-name", "checksum"])
async def test_a_record_that_cannot_be_read_is_set_aside_and_routing_goes_on(
    kafka_bootstrap: str, flaw: str
) -> None:
    # aiokafka fails the whole fetch on it (UnicodeDecodeError): the consumer raised, and every
    # new consumer read it again from the commit: routing stopped for good, health green.
    config = kafka_config(kafka_bootstrap, partitions=1)
    async with open_bus(config) as bus:
        await bus.publish(event(0))
        await _produce_unreadable(kafka_bootstrap, config.topic, encode(event(1)), flaw)
        await bus.publish(event(2))
        got = await take(bus.messages(), 3)
        assert [m.event.get("id") for m in got] == ["e-0", None, "e-2"]
        reason = got[1].rejected or ""
        assert "unreadable Kafka record" in reason, reason
        assert ("Corrupt" if flaw == "checksum" else "UnicodeDecodeError") in reason, reason
        for msg in got:
            await msg.ack()


async def test_a_member_that_receives_nothing_while_records_wait_is_stalled(
    kafka_bootstrap: str,
) -> None:
    # A broker answering every fetch empty (Tansu on slow storage with a short fetch wait):
    # readiness stayed green, events were accepted (202) and none was routed. The partition
    # is paused here, on the client, to the same effect.
    config = kafka_config(kafka_bootstrap, partitions=1, max_in_flight=1)
    async with open_bus(config) as bus:
        bus.stall_after = 1.0
        reading = aiter(bus.messages())
        for i in range(5):
            await bus.publish(event(i))
        first = await anext(reading)
        assert bus.stalled() is None  # the window is full: waiting on us
        (member,) = bus._consumptions
        (tp,) = member.partitions
        member.consumer.pause(tp)
        await first.ack()
        waiting = asyncio.create_task(anext(reading))
        why = await eventually(bus.stalled, within=PATIENCE, every=0.1, what="a stall")
        assert why.startswith("4 events wait on the broker for this consumer, and none "), why
        member.consumer.resume(tp)
        async with asyncio.timeout(PATIENCE):
            second = await waiting
        assert bus.stalled() is None
        await second.ack()
        await reading.aclose()


async def test_a_member_whose_rebalance_never_ends_is_stalled(kafka_bootstrap: str) -> None:
    # Tansu's coordinator, a leader leaving while another member joined, kept the departed
    # leader: every member rejoined for ever, none was assigned a partition, and readiness
    # stayed green (the stall check looked only at the partitions a member held). The
    # rebalance is begun here by the listener's own call, as the client makes it, and ended
    # by the assignment.
    config = kafka_config(kafka_bootstrap, partitions=1)
    async with open_bus(config) as bus:
        bus.stall_after = 0.5
        await bus.publish(event(0))
        reading = aiter(bus.messages())
        await (await anext(reading)).ack()
        (member,) = bus._consumptions
        assert bus.stalled() is None
        assigned = set(member.partitions)
        await member.on_partitions_revoked(assigned)
        why = await eventually(bus.stalled, within=PATIENCE, every=0.1, what="a stall")
        assert why.startswith(f"the Kafka consumer group {config.group_id!r} has been rebalancing")
        await member.on_partitions_assigned(assigned)
        assert bus.stalled() is None
        await reading.aclose()


async def test_a_topic_made_again_under_the_consumer_is_read_from_its_start(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Deleted, then made again by the next publish: the consumer waited at the offset it had
    # reached in the old log (Tansu answers a fetch past the end with nothing), and every
    # event of the new one was accepted (202) and never routed, readiness green.
    config = kafka_config(kafka_bootstrap, partitions=1)
    async with open_bus(config) as bus:
        reading = aiter(bus.messages())
        for n in range(10):
            await bus.publish(event(n))
        for msg in await take(reading, 10):
            await msg.ack()
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([config.topic])
        finally:
            await admin.close()
        for n in range(100, 103):
            await bus.publish(event(n))
        got = await take(reading, 3)
        assert [m.event["id"] for m in got] == ["e-100", "e-101", "e-102"]
        assert "below offset 10 this consumer reached: the topic was made again" in caplog.text
        for msg in got:
            await msg.ack()
        await reading.aclose()


def test_a_copy_is_told_from_the_same_record_handed_out_again() -> None:
    recent = _Recent(window=10.0, kept=3)
    assert not recent.copy(b"k1", "kafka:t:0:5:1", now=0.0)
    assert not recent.copy(b"k1", "kafka:t:0:5:1", now=1.0)  # a nak's redelivery
    assert recent.copy(b"k1", "kafka:t:0:9:2", now=2.0)  # a second record: a copy
    assert not recent.copy(None, "kafka:t:0:10:2", now=2.0)  # no key: nothing to tell
    assert not recent.copy(b"k1", "kafka:t:0:11:3", now=12.5)  # past the window: an event
    for i in range(2, 6):  # beyond `kept`, the oldest are forgotten first
        assert not recent.copy(b"k%d" % i, f"kafka:t:0:{20 + i}:4", now=13.0)
    assert not recent.copy(b"k1", "kafka:t:0:30:5", now=13.0)


def test_a_record_without_a_key_is_never_a_copy_whatever_its_headers() -> None:
    # someone else's record with a scope header and no key crashed the consumer
    # (None + bytes), at the same offset every time
    from aiokafka.structs import ConsumerRecord as Record

    from eventbus.bus._kafka import _KafkaMessage

    record = Record("t", 0, 5, 0, 0, None, b"{}", None, 0, 2, [("eventbus-scope", b"invoke:a")])
    assert _KafkaMessage(record, None, TopicPartition("t", 0), _Partition()).key is None  # type: ignore[arg-type]


async def test_a_broker_that_accepts_and_never_answers_is_named_at_the_start() -> None:
    # It said "Kafka create topic eventbus.events failed: TimeoutError()": which broker, and
    # after how long, the operator had to guess.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads whatever comes, answers nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = kafka_config(f"127.0.0.1:{port}", connect_timeout=1.0)
        with pytest.raises(BusUnavailable) as info:
            async with open_bus(config):
                pass
        assert str(info.value).startswith(
            f"Kafka at 127.0.0.1:{port} did not answer within 1 s (creating topic {config.topic})"
        ), info.value
    finally:
        server.close()
        await server.wait_closed()
