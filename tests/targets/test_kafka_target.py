"""The Kafka target against a real Kafka-compatible broker (Tansu, ``kafka_bootstrap`` fixture).

Records are read back with aiokafka to check key, headers and value. Tansu has no
InitProducerId, so these tests run the producer with ``idempotent=False``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from eventbus._errors import ConfigError
from eventbus.cloudevents import from_kafka
from eventbus.targets import KafkaTarget, KafkaTargetConfig, Outcome
from eventbus.targets._base import MAX_ERROR_CHARS
from tests.fixtures.kafka import TansuBroker
from tests.fixtures.nats import unique_name


def make_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/tests/targets",
        "type": "com.example.order.created",
        "datacontenttype": "application/json",
        "partitionkey": "order-7",
        "data": {"customer": {"id": "c-42", "tier": 2}, "total": 12.5},
    }
    event.update(overrides)
    return event


def config_for(bootstrap: str, **kw: Any) -> KafkaTargetConfig:
    kw.setdefault("topic", unique_name("target"))
    return KafkaTargetConfig(name="orders", bootstrap_servers=bootstrap, idempotent=False, **kw)


async def read_records(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord[Any, Any]]:
    """The first ``count`` records of ``topic``; fails after a bounded number of polls."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    records: list[ConsumerRecord[Any, Any]] = []
    try:
        for _ in range(40):
            batches = await consumer.getmany(timeout_ms=250)
            for batch in batches.values():
                records.extend(batch)
            if len(records) >= count:
                return records[:count]
    finally:
        await consumer.stop()
    raise AssertionError(f"read {len(records)} of {count} records from {topic}")


async def deliver_once(config: KafkaTargetConfig, event: dict[str, Any], payload: Any) -> Outcome:
    async with KafkaTarget(config) as target:
        return await target.deliver(event, payload, is_cloudevent=payload is event, attempt=1)


@pytest.fixture
async def target(kafka_bootstrap: str) -> AsyncIterator[KafkaTarget]:
    async with KafkaTarget(config_for(kafka_bootstrap)) as opened:
        yield opened


# --- what is sent ---------------------------------------------------------------------------


async def test_binary_mode_sends_ce_headers_data_value_and_partitionkey(
    kafka_bootstrap: str,
) -> None:
    config = config_for(kafka_bootstrap)
    event = make_event()
    outcome = await deliver_once(config, event, event)
    assert outcome.delivered and outcome.error is None and outcome.status is None
    assert outcome.duration_ms > 0
    (record,) = await read_records(kafka_bootstrap, config.topic, 1)
    headers = dict(record.headers)
    assert record.key == b"order-7"
    assert headers["ce_id"] == b"evt-1"
    assert headers["ce_source"] == b"/tests/targets"
    assert headers["ce_type"] == b"com.example.order.created"
    assert headers["ce_specversion"] == b"1.0"
    assert headers["content-type"] == b"application/json"
    assert orjson.loads(record.value) == event["data"]
    assert from_kafka(record.headers, record.key, record.value) == event


async def test_structured_mode_sends_the_json_event(kafka_bootstrap: str) -> None:
    config = config_for(kafka_bootstrap, mode="structured")
    event = make_event()
    assert (await deliver_once(config, event, event)).delivered
    (record,) = await read_records(kafka_bootstrap, config.topic, 1)
    assert dict(record.headers) == {"content-type": b"application/cloudevents+json"}
    assert record.key == b"order-7"
    assert orjson.loads(record.value) == event


async def test_binary_payload_is_sent_as_raw_bytes(kafka_bootstrap: str) -> None:
    config = config_for(kafka_bootstrap)
    event = make_event(datacontenttype="image/png", data_base64="iVBORw0KGgo=")
    del event["data"]
    assert (await deliver_once(config, event, event)).delivered
    (record,) = await read_records(kafka_bootstrap, config.topic, 1)
    assert record.value == b"\x89PNG\r\n\x1a\n"
    assert dict(record.headers)["content-type"] == b"image/png"


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("$.data.customer.id", b"c-42"),
        ("$.data.customer.tier", b"2"),
        ("$.data.customer", b'{"id":"c-42","tier":2}'),
        ("$.data.missing", None),
        ("$.data.nothing", None),
    ],
)
async def test_key_from_jsonpath(kafka_bootstrap: str, path: str, key: bytes | None) -> None:
    config = config_for(kafka_bootstrap, key=path)
    event = make_event()
    event["data"]["nothing"] = None
    assert (await deliver_once(config, event, event)).delivered
    (record,) = await read_records(kafka_bootstrap, config.topic, 1)
    assert record.key == key


async def test_no_partitionkey_and_no_key_path_sends_no_key(kafka_bootstrap: str) -> None:
    config = config_for(kafka_bootstrap)
    event = make_event()
    del event["partitionkey"]
    assert (await deliver_once(config, event, event)).delivered
    (record,) = await read_records(kafka_bootstrap, config.topic, 1)
    assert record.key is None


@pytest.mark.parametrize(
    ("payload", "value", "content_type"),
    [
        ({"order": "order-7", "n": [1, 2]}, b'{"order":"order-7","n":[1,2]}', b"application/json"),
        (42, b"42", b"application/json"),
        ("order order-7 shipped", b"order order-7 shipped", b"text/plain; charset=utf-8"),
    ],
)
async def test_transformed_payload_is_the_value_with_event_identity(
    kafka_bootstrap: str, payload: Any, value: bytes, content_type: bytes
) -> None:
    config = config_for(kafka_bootstrap)
    outcome = await deliver_once(config, make_event(), payload)
    assert outcome.delivered
    (record,) = await read_records(kafka_bootstrap, config.topic, 1)
    assert record.value == value
    assert record.key == b"order-7"
    assert dict(record.headers) == {
        "ce_specversion": b"1.0",
        "ce_id": b"evt-1",
        "ce_source": b"/tests/targets",
        "ce_type": b"com.example.order.created",
        "content-type": content_type,
    }


async def test_key_path_applies_to_transformed_payload(kafka_bootstrap: str) -> None:
    config = config_for(kafka_bootstrap, key="$.data.customer.id")
    assert (await deliver_once(config, make_event(), {"x": 1})).delivered
    (record,) = await read_records(kafka_bootstrap, config.topic, 1)
    assert record.key == b"c-42"


async def test_concurrent_deliveries_share_one_producer(kafka_bootstrap: str) -> None:
    config = config_for(kafka_bootstrap)
    async with KafkaTarget(config) as target:
        outcomes = await asyncio.gather(
            *(
                target.deliver(make_event(id=f"e-{i}"), {"i": i}, is_cloudevent=False, attempt=1)
                for i in range(50)
            )
        )
    assert all(outcome.delivered for outcome in outcomes)
    records = await read_records(kafka_bootstrap, config.topic, 50)
    assert sorted(dict(r.headers)["ce_id"] for r in records) == sorted(
        f"e-{i}".encode() for i in range(50)
    )


# --- failures -------------------------------------------------------------------------------


async def test_oversized_record_is_final_and_target_keeps_working(target: KafkaTarget) -> None:
    huge = make_event(data={"blob": "x" * (2 * 1024 * 1024)})
    outcome = await target.deliver(huge, huge, is_cloudevent=True, attempt=1)
    assert not outcome.delivered and not outcome.retryable and outcome.status is None
    assert outcome.error is not None and "too large" in outcome.error
    assert len(outcome.error) <= MAX_ERROR_CHARS
    event = make_event()
    assert (await target.deliver(event, event, is_cloudevent=True, attempt=1)).delivered


@pytest.mark.parametrize(
    ("event", "payload", "is_cloudevent"),
    [
        (make_event(), {1, 2}, False),
        ({"id": "no-source"}, "text", False),
        (make_event(), make_event(data={1, 2}), True),
    ],
    ids=["not-json", "event-without-identity", "cloudevent-with-bad-data"],
)
async def test_unsendable_payload_is_final_and_target_keeps_working(
    target: KafkaTarget, event: dict[str, Any], payload: Any, is_cloudevent: bool
) -> None:
    outcome = await target.deliver(event, payload, is_cloudevent=is_cloudevent, attempt=1)
    assert not outcome.delivered and not outcome.retryable
    assert outcome.error is not None and outcome.error.startswith("cannot build the record")
    good = make_event()
    assert (await target.deliver(good, good, is_cloudevent=True, attempt=1)).delivered


async def test_broker_down_is_retryable_and_target_recovers_when_it_appears(
    tansu_binary: str,
) -> None:
    broker = TansuBroker(tansu_binary)  # its port is closed until start()
    config = config_for(broker.bootstrap, timeout=5.0)
    event = make_event()
    try:
        async with KafkaTarget(config) as target:
            for attempt in (1, 2):
                outcome = await target.deliver(event, event, is_cloudevent=True, attempt=attempt)
                assert not outcome.delivered and outcome.retryable and outcome.status is None
                assert outcome.error is not None and broker.bootstrap in outcome.error
            broker.start()
            outcome = await target.deliver(event, event, is_cloudevent=True, attempt=3)
            assert outcome.delivered, outcome.error
        (record,) = await read_records(broker.bootstrap, config.topic, 1)
        assert dict(record.headers)["ce_id"] == b"evt-1"
    finally:
        broker.stop()


async def test_broker_lost_after_start_is_retryable_and_target_recovers(
    tansu_binary: str,
) -> None:
    broker = TansuBroker(tansu_binary)
    broker.start()
    # A short timeout: with the broker gone, the attempt waits for it until the timeout.
    config = config_for(broker.bootstrap, timeout=1.0)
    event = make_event()
    try:
        async with KafkaTarget(config) as target:
            assert (await target.deliver(event, event, is_cloudevent=True, attempt=1)).delivered
            broker.stop()
            outcome = await target.deliver(event, event, is_cloudevent=True, attempt=2)
            assert not outcome.delivered and outcome.retryable and outcome.status is None
            broker.start()  # same port; Tansu's memory storage starts empty
            outcome = await target.deliver(event, event, is_cloudevent=True, attempt=3)
            assert outcome.delivered, outcome.error
    finally:
        broker.stop()


async def test_idempotent_producer_on_a_broker_without_it_is_a_retryable_failure(
    kafka_bootstrap: str,
) -> None:
    # Tansu lacks InitProducerId: the default idempotent producer cannot start there. The
    # failure must be an outcome, not an exception, and must not stop the target from closing.
    config = KafkaTargetConfig(
        name="orders", bootstrap_servers=kafka_bootstrap, topic=unique_name("target")
    )
    event = make_event()
    outcome = await deliver_once(config, event, event)
    assert not outcome.delivered and outcome.retryable and outcome.error


# --- contract -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("topic", "", "topic must be"),
        ("topic", "has space", "topic must be"),
        ("topic", "..", "topic must be"),
        ("topic", "t" * 250, "topic must be"),
        ("key", "$.data[", "invalid key JSONPath"),
        ("key", "data.customer.id", "must be a JSONPath"),
        ("bootstrap_servers", "", "bootstrap_servers"),
        ("bootstrap_servers", "a:9092,,b:9092", "bootstrap_servers"),
        ("mode", "batched", "mode must be"),
        ("timeout", 0, "timeout must be"),
    ],
)
def test_bad_config_names_the_target(field: str, value: Any, reason: str) -> None:
    settings: dict[str, Any] = {"bootstrap_servers": "127.0.0.1:9092", "topic": "t"}
    settings[field] = value
    with pytest.raises(ConfigError, match=rf"Kafka target 'orders'.*{reason}"):
        KafkaTarget(KafkaTargetConfig(name="orders", **settings))


async def test_deliver_outside_context_raises() -> None:
    target = KafkaTarget(KafkaTargetConfig(name="o", bootstrap_servers="127.0.0.1:1", topic="t"))
    event = make_event()
    with pytest.raises(RuntimeError, match="not open"):
        await target.deliver(event, event, is_cloudevent=True, attempt=1)


async def test_opening_twice_raises_and_target_reopens_after_close(kafka_bootstrap: str) -> None:
    target = KafkaTarget(config_for(kafka_bootstrap))
    event = make_event()
    async with target:
        with pytest.raises(RuntimeError, match="already open"):
            await target.__aenter__()
        assert (await target.deliver(event, event, is_cloudevent=True, attempt=1)).delivered
    async with target:
        assert (await target.deliver(event, event, is_cloudevent=True, attempt=2)).delivered
