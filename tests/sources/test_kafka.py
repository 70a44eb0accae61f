"""The kafka source against a real broker (Tansu), real Postgres and the real NATS bus."""

from __future__ import annotations

import base64
import contextlib
import functools
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from eventbus._errors import CloudEventError, ConfigError
from eventbus.cloudevents import from_kafka
from eventbus.sources import SourceContext, build_source
from eventbus.sources import _kafka as kafka_module
from eventbus.sources._kafka import KafkaSource
from eventbus.sources._queues import events_of, raw_event
from tests.bus.test_kafka import _produce_unreadable
from tests.fixtures.kafka import TansuBroker
from tests.fixtures.nats import unique_name
from tests.fixtures.wait import eventually
from tests.sources._harness import dead_letters, running, source_pool
from tests.sources.test_queue_support import BusTap, bus_tap, context


@contextlib.asynccontextmanager
async def topic(bootstrap: str, partitions: int = 1) -> AsyncIterator[tuple[str, AIOKafkaProducer]]:
    """A fresh topic (one partition, unless told) and a producer for it."""
    name = unique_name("src")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        yield name, producer
    finally:
        await producer.stop()


def kafka(name: str, bootstrap: str, topic_name: str, **settings: Any) -> KafkaSource:
    source = build_source(
        {
            "name": name,
            "type": "kafka",
            "bootstrap_servers": bootstrap,
            "topics": [topic_name],
            # Tansu holds each group join for about half of it: 1 s instead of 5 s
            "session_timeout": 2,
            **settings,
        }
    )
    assert isinstance(source, KafkaSource)
    return source


async def committed(bootstrap: str, group: str, topic_name: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(topic_name, 0))
        return offset
    finally:
        await consumer.stop()


async def wait_committed(bootstrap: str, group: str, topic_name: str, offset: int) -> None:
    """Wait until ``group`` has committed ``offset``. Bounded generously: Tansu only lets a
    restarted member rejoin its group after the old member's session timed out (and then holds
    the join for half a session timeout)."""

    async def at_offset() -> bool:
        return await committed(bootstrap, group, topic_name) == offset

    await eventually(at_offset, within=40, every=0.2, what=f"group {group} at offset {offset}")


async def test_cloudevents_records_arrive_and_malformed_ones_are_kept(
    kafka_bootstrap: str, database_dsn: str, nats_url: str
) -> None:
    async with (
        topic(kafka_bootstrap) as (name, producer),
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        await producer.send_and_wait(
            name,
            b'{"size": 3}',
            key=b"k1",
            headers=[
                ("ce_specversion", b"1.0"),
                ("ce_id", b"e-1"),
                ("ce_source", b"/orders"),
                ("ce_type", b"order.created"),
                ("content-type", b"application/json"),
            ],
        )
        structured = {"specversion": "1.0", "id": "e-2", "source": "/o", "type": "t", "data": 1}
        await producer.send_and_wait(
            name,
            orjson.dumps(structured),
            headers=[("content-type", b"application/cloudevents+json")],
        )
        await producer.send_and_wait(name, b"{not json")
        # a binary-mode one without its ce_id: kept with its key and headers (its attributes)
        await producer.send_and_wait(
            name,
            b'{"size": 4}',
            key=b"k\xff",
            headers=[("ce_specversion", b"1.0"), ("ce_type", b"t"), ("x-n", b"\xff" * 5000)],
        )
        # one the client cannot read (a header name that is not UTF-8): every fetch from it
        # failed, and the source restarted on it for ever
        await _produce_unreadable(kafka_bootstrap, name, b"{}", "header-name")
        await producer.send_and_wait(name, orjson.dumps({**structured, "id": "e-3"}))
        ctx = context(pool, "orders", tap, type="kafka")
        async with running(kafka("orders", kafka_bootstrap, name), ctx):
            first, second, third = await tap.take(3)
            await wait_committed(kafka_bootstrap, "eventbus-source-orders", name, 6)
        assert (first["id"], first["type"], first["source"]) == ("e-1", "order.created", "/orders")
        assert first["data"] == {"size": 3}
        assert first["partitionkey"] == "k1"
        assert (second["id"], second["data"]) == ("e-2", 1)
        # The malformed record is kept with its error and does not stop the stream.
        assert third["id"] == "e-3"
        rows = sorted(await dead_letters(pool, "orders"), key=lambda r: r["payload"])
        assert [r["payload"] for r in rows] == [b"", b'{"size": 4}', b"{not json"]
        unreadable, binary, malformed = (orjson.loads(r["meta"]) for r in rows)
        assert malformed == {"topic": name, "partition": 0, "offset": 2}
        assert binary == {
            "topic": name,
            "partition": 0,
            "offset": 3,
            "key": {"value_base64": base64.b64encode(b"k\xff").decode()},
            "headers": [
                {"name": "ce_specversion", "value": "1.0"},
                {"name": "ce_type", "value": "t"},
                {
                    "name": "x-n",
                    "value_base64": base64.b64encode(b"\xff" * 4096).decode(),
                    "truncated": True,
                },
            ],
        }
        assert unreadable == {"topic": name, "partition": 0, "offset": 4}
        assert "cannot be read" in rows[0]["error"] and "id" in rows[1]["error"]
        assert (ctx.status.events, ctx.status.errors, ctx.status.lag) == (3, 3, 0)


RAW = {"format": "raw", "event_type": "com.example.n", "event_source": "/tests/remade"}


@pytest.mark.timeout(120)
async def test_a_topic_made_again_is_read_from_its_start(
    kafka_bootstrap: str, database_dsn: str, nats_url: str
) -> None:
    # The consumer kept its position (5) in the partition of a topic deleted and made again:
    # the broker answered its fetches with nothing, not "out of range", and the new records
    # (offsets 0-2) were never read, the source running with a lag of 0.
    async with (
        topic(kafka_bootstrap) as (name, producer),
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        ctx = context(pool, "remade", tap, type="kafka")
        async with running(kafka("remade", kafka_bootstrap, name, **RAW), ctx):
            for i in range(5):
                await producer.send_and_wait(name, orjson.dumps({"n": i}))
            await tap.take(5)
            await wait_committed(kafka_bootstrap, "eventbus-source-remade", name, 5)
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            try:
                await admin.delete_topics([name])
                await admin.create_topics([NewTopic(name, 1, 1)])
            finally:
                await admin.close()
            for i in range(3):
                await producer.send_and_wait(name, orjson.dumps({"again": i}))
            again = await tap.take(3)
        assert [e["data"] for e in again] == [{"again": i} for i in range(3)]


@pytest.mark.timeout(120)
async def test_records_before_and_after_an_unreadable_one_come_at_once(
    kafka_bootstrap: str, database_dsn: str, nats_url: str
) -> None:
    # Past an unreadable record, each partition was read one record at a time, an empty one
    # waiting a second: a record of the partition per round of (partitions - 1) seconds, up
    # to the bad one (hours behind thousands).
    async with (
        topic(kafka_bootstrap, partitions=4) as (name, producer),
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        for i in range(60):
            await producer.send(name, orjson.dumps({"n": i}), partition=0)
        await producer.flush()
        await _produce_unreadable(kafka_bootstrap, name, b"{}", "header-name")
        for i in range(60, 80):
            await producer.send(name, orjson.dumps({"n": i}), partition=0)
        await producer.flush()
        ctx = context(pool, "walk", tap, type="kafka")
        async with running(kafka("walk", kafka_bootstrap, name, **RAW), ctx):
            # each part within the tap's bound, 10 s (one record a round took 3 s each)
            events = [*await tap.take(30), *await tap.take(30), *await tap.take(20)]
        assert sorted(e["data"]["n"] for e in events) == list(range(80))
        (row,) = await dead_letters(pool, "walk")
        assert orjson.loads(row["meta"]) == {"topic": name, "partition": 0, "offset": 60}


async def _backing_off(ctx: SourceContext) -> bool:
    return ctx.status.state == "backoff"


async def test_raw_format_wraps_json_text_and_bytes(
    kafka_bootstrap: str, database_dsn: str, nats_url: str
) -> None:
    async with (
        topic(kafka_bootstrap) as (name, producer),
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        for value in (b'{"a": 1}', "héllo".encode(), b"\xff\x00\xfe"):
            await producer.send_and_wait(name, value, key=b"device-7")
        source = kafka(
            "raw", kafka_bootstrap, name, format="raw", event_type="t.raw", event_source="/kafka"
        )
        async with running(source, context(pool, "raw", tap, type="kafka")):
            events = await tap.take(3)
    # <topic>/<partition>/<offset>/<record timestamp, ms>: a topic made again (or a broker
    # that lost its log) hands the same offsets out again, for other records
    stamps = [round(datetime.fromisoformat(e["time"]).timestamp() * 1000) for e in events]
    assert [e["id"] for e in events] == [f"{name}/0/{i}/{stamps[i]}" for i in range(3)]
    assert all(e["type"] == "t.raw" and e["source"] == "/kafka" for e in events)
    assert all(e["subject"] == "device-7" for e in events)
    assert events[0]["data"] == {"a": 1}
    assert events[1]["data"] == "héllo"
    assert events[1]["datacontenttype"].startswith("text/plain")
    assert base64.b64decode(events[2]["data_base64"]) == b"\xff\x00\xfe"


async def test_s3_notification_format_maps_every_record(
    kafka_bootstrap: str, database_dsn: str, nats_url: str
) -> None:
    def record(key: str) -> dict[str, Any]:
        return {
            "eventVersion": "2.1",
            "eventSource": "minio:s3",
            "eventTime": "2026-01-01T10:00:00.000Z",
            "eventName": "s3:ObjectCreated:Put",
            "responseElements": {"x-amz-request-id": f"req-{key}", "x-amz-id-2": "host"},
            "s3": {
                "bucket": {"name": "photos"},
                "object": {"key": key, "size": 10, "eTag": "abc", "sequencer": "0001"},
            },
        }

    async with (
        topic(kafka_bootstrap) as (name, producer),
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        body = orjson.dumps({"Records": [record("a.jpg"), record("b.jpg")]})
        await producer.send_and_wait(name, body)
        source = kafka("minio", kafka_bootstrap, name, format="s3-notification")
        async with running(source, context(pool, "minio", tap, type="kafka")):
            events = await tap.take(2)
    assert [e["subject"] for e in events] == ["a.jpg", "b.jpg"]


def _numbered(prefix: str, i: int) -> bytes:
    """A record: the structured CloudEvent with id ``<prefix><i>``."""
    return orjson.dumps({"specversion": "1.0", "id": f"{prefix}{i}", "source": "/s", "type": "t"})


@contextlib.asynccontextmanager
async def _loaded_topic(
    kafka_bootstrap: str, database_dsn: str, nats_url: str, records: list[bytes]
) -> AsyncIterator[tuple[str, AIOKafkaProducer, asyncpg.Pool, BusTap]]:
    """A fresh topic holding ``records``, its producer, a source pool and a bus tap."""
    async with (
        topic(kafka_bootstrap) as (name, producer),
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        for record in records:
            await producer.send(name, record)
        await producer.flush()
        yield name, producer, pool, tap


@pytest.mark.slow
async def test_bus_down_commits_nothing_then_restart_loses_nothing(
    kafka_bootstrap: str, database_dsn: str, nats_url: str
) -> None:
    event = functools.partial(_numbered, "n")
    group = "eventbus-source-restart"
    first = [event(i) for i in range(3)]
    async with _loaded_topic(kafka_bootstrap, database_dsn, nats_url, first) as loaded:
        name, producer, pool, tap = loaded
        ctx = context(pool, "restart", tap, type="kafka")
        async with running(kafka("restart", kafka_bootstrap, name), ctx):
            await tap.wait_published(3)
            await wait_committed(kafka_bootstrap, group, name, 3)
            tap.down = True
            for i in range(3, 6):
                await producer.send_and_wait(name, event(i))
            await tap.wait_refused(1)
            await eventually(lambda: _backing_off(ctx))
            # the three waiting (it said 0 while backing off)
            await eventually(lambda: ctx.status.lag == 3, what="the lag of a source backing off")
            assert await committed(kafka_bootstrap, group, name) == 3
        # Stopped while the bus was down (a crash); produce more, come back with the bus up.
        for i in range(6, 8):
            await producer.send_and_wait(name, event(i))
        tap.down = False
        async with running(kafka("restart", kafka_bootstrap, name), ctx):
            await wait_committed(kafka_bootstrap, group, name, 8)
        ids = [e["id"] for e in await tap.take(8)]
    assert sorted(ids) == [f"n{i}" for i in range(8)]


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"topics": []}, "field 'topics'"),
        ({"format": "raw"}, "needs both 'event_type' and 'event_source'"),
        ({"format": "avro"}, "field 'format'"),
        ({"start": "middle"}, "field 'start'"),
        ({"batch": 0}, "field 'batch'"),
        ({"session_timeout": 0}, "field 'session_timeout'"),
        ({"topic": "x"}, "field 'topic'"),
        # the broker refuses such a topic: the source sat in "starting" for ever
        ({"topics": ["ok", "bad topic"]}, "field 'topics.1': Value error, a topic is 1-249"),
        ({"bootstrap_servers": "127.0.0.1:9092,"}, "field 'bootstrap_servers': Value error, must"),
    ],
)
def test_bad_kafka_config_names_the_source(settings: dict[str, Any], fragment: str) -> None:
    spec = {"name": "k", "type": "kafka", "bootstrap_servers": "127.0.0.1:9", "topics": ["t"]}
    with pytest.raises(ConfigError, match=f"source 'k' \\(kafka\\): .*{fragment}"):
        build_source({**spec, **settings})


def test_raw_format_refuses_an_integer_json_would_change() -> None:
    # read as a float it became 1.2345678901234568e+29; the message is dead-lettered instead
    source = kafka(
        "raw", "127.0.0.1:9", "t", format="raw", event_type="t.raw", event_source="/kafka"
    )
    with pytest.raises(CloudEventError, match="beyond 64 bits"):
        raw_event(source.config, b'{"n": 123456789012345678901234567890}')
    assert raw_event(source.config, b'{"n": 18446744073709551615}')["data"] == {"n": 2**64 - 1}


def test_raw_format_leaves_out_a_subject_that_is_no_attribute() -> None:
    # a fanout exchange's empty routing key, an integer Kafka key (control characters): the
    # message was dead-lettered for its subject
    source = kafka(
        "raw", "127.0.0.1:9", "t", format="raw", event_type="t.raw", event_source="/kafka"
    )
    for subject in ("", "\x00\x00\x00\x07"):
        assert "subject" not in raw_event(source.config, b"{}", subject=subject, id="")
    assert raw_event(source.config, b"{}", subject="device-7")["subject"] == "device-7"


async def test_records_with_odd_timestamps_headers_or_keys_are_routed(
    kafka_bootstrap: str, database_dsn: str, nats_url: str
) -> None:
    # A timestamp no date can hold or a header without a value raised out of the source: it
    # restarted on the same record for ever (the records before it published again each time,
    # those after never). An integer key made a partitionkey of control characters: dead-lettered.
    def structured(n: int) -> bytes:
        return orjson.dumps({"specversion": "1.0", "id": f"e-{n}", "source": "/o", "type": "t"})

    async with (
        topic(kafka_bootstrap) as (name, producer),
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        await producer.send_and_wait(name, structured(1), timestamp_ms=400_000_000_000_000)
        binary = [("ce_specversion", b"1.0"), ("ce_id", b"e-2"), ("ce_source", b"/o")]
        headers: list[tuple[str, bytes | None]] = [*binary, ("ce_type", b"t"), ("ce_subject", None)]
        await producer.send_and_wait(name, b"", headers=headers)  # type: ignore[arg-type]
        await producer.send_and_wait(name, structured(3), key=(7).to_bytes(8, "big"))
        await producer.send_and_wait(name, structured(4), key=b"k4")
        ctx = context(pool, "odd", tap, type="kafka")
        async with running(kafka("odd", kafka_bootstrap, name), ctx):
            events = await tap.take(4)
            await wait_committed(kafka_bootstrap, "eventbus-source-odd", name, 4)
        assert [e["id"] for e in events] == ["e-1", "e-2", "e-3", "e-4"]
        assert "subject" not in events[1]
        assert "partitionkey" not in events[2] and events[3]["partitionkey"] == "k4"
        assert await dead_letters(pool, "odd") == []
        assert (ctx.status.events, ctx.status.errors) == (4, 0)


@pytest.mark.parametrize("fmt", ["cloudevents", "raw", "s3-notification"])
def test_every_format_holds_events_to_the_service_size_limit(fmt: str) -> None:
    # The sources used the library's default (256 KiB) whatever max_event_size said: a
    # service allowing 1 MiB dead-lettered a 300 KB message, one allowing 4 KiB took it.
    source = kafka("raw", "127.0.0.1:9", "t", format=fmt, event_type="t.raw", event_source="/kafka")
    big = "x" * 300_000
    if fmt == "s3-notification":
        record = {
            "eventSource": "aws:s3",
            "eventName": "s3:ObjectCreated:Put",
            "eventTime": "2026-01-01T00:00:00Z",
            "responseElements": {"x-amz-request-id": "r", "x-amz-id-2": "h"},
            "s3": {"bucket": {"name": "b"}, "object": {"key": "k", "size": 1}},
            "userIdentity": {"principalId": big},
        }
        payload = orjson.dumps({"Records": [record]})
    else:
        payload = orjson.dumps(
            {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": big}
        )

    def cloudevent(size: int) -> dict[str, Any]:
        return from_kafka([], None, payload, max_size=size)

    (event,) = events_of(source.config, payload, cloudevent, max_size=1 << 20)
    assert big in orjson.dumps(event).decode()
    with pytest.raises(CloudEventError, match="4096-byte limit") as refused:
        events_of(source.config, payload, cloudevent, max_size=4096)
    assert refused.value.status == 413


async def test_the_status_says_backoff_while_no_broker_answers(
    tansu_binary: str, database_dsn: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiokafka's fetches reconnect by themselves and never raise: the source showed running,
    # no error, for as long as its broker was dead (or frozen), the client logging each failed
    # connection.
    monkeypatch.setattr(kafka_module, "PROBE_EVERY", 0.5)
    monkeypatch.setattr(kafka_module, "PROBE_TIMEOUT", 2.0)
    broker = TansuBroker(tansu_binary)
    broker.start()
    try:
        async with (
            topic(broker.bootstrap) as (name, producer),
            source_pool(database_dsn) as pool,
            bus_tap(nats_url) as tap,
        ):
            await producer.send_and_wait(name, b"{}")
            ctx = context(pool, "k", tap, type="kafka")
            raw = {"format": "raw", "event_type": "t", "event_source": "/k"}
            async with running(kafka("k", broker.bootstrap, name, **raw), ctx):
                await tap.take(1)
                assert ctx.status.state == "running"
                broker.stop()

                async def backing_off() -> bool:
                    return ctx.status.state == "backoff"

                await eventually(backing_off, within=20, what="backoff with the broker dead")
                assert "no Kafka broker answers a metadata request" in (ctx.status.last_error or "")
                broker.start()

                async def running_again() -> bool:
                    return ctx.status.state == "running"

                await eventually(running_again, within=30, what="running once it answers")
                assert ctx.status.last_error is None  # the reason went with the failure
    finally:
        broker.stop()


@pytest.mark.parametrize("seam", ["publish", "publish_many"])
async def test_a_fetched_batch_goes_to_the_bus_at_once_and_a_refusal_rewinds_to_it(
    kafka_bootstrap: str, database_dsn: str, nats_url: str, seam: str
) -> None:
    # One record at a time, each waited for the bus's acknowledgement of the one before: the
    # ingest took no more than a record per round trip; then one call per record cost 90 µs
    # of CPU per event against 30-40 for the bus's own batch. Now a fetched batch goes in one
    # call (the service's seam, publish_many), or concurrently through a per-event publish.
    # A record refused stops its partition's commit just before it; it and everything after
    # it are published again from there (the bus drops the repeats).
    records = [_numbered("b", i) for i in range(40)]
    async with _loaded_topic(kafka_bootstrap, database_dsn, nats_url, records) as loaded:
        name, _, pool, tap = loaded
        ctx = context(pool, f"batch-{seam}", tap, type="kafka")
        under_way = most = 0

        async def publish(event: dict[str, Any], *, via: str = "test") -> None:
            nonlocal under_way, most
            under_way += 1
            most = max(most, under_way)
            try:
                await tap.publish(event, via=via)
            finally:
                under_way -= 1

        ctx.publish = publish
        if seam == "publish_many":
            ctx.publish_many = tap.publish_many
        tap.refuse_once = {"b7"}
        async with running(kafka(f"batch-{seam}", kafka_bootstrap, name), ctx):
            await wait_committed(kafka_bootstrap, f"eventbus-source-batch-{seam}", name, 40)
        assert tap.refused == 1
        if seam == "publish_many":
            assert max(tap.calls) > 1 and sum(tap.calls) < 2 * 40  # not a call per record
        else:
            assert most > 1 and tap.calls == []
        ids = [e["id"] for e in await tap.take(40)]
    assert sorted(ids) == sorted(f"b{i}" for i in range(40))
    assert ctx.status.events >= 40 and ctx.status.errors == 1
