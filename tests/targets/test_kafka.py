"""The Kafka target against a real Kafka-compatible broker (Tansu, ``kafka_bootstrap`` fixture).

Records are read back with aiokafka to check key, headers and value. Tansu has no
InitProducerId, so these tests run the producer with ``idempotent=False``. What every target
does (lifecycle, timeouts, refusals, outcomes) is test_contract.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiokafka.errors as kerr
import orjson
import pytest
import yaml

from eventbus._errors import ConfigError
from eventbus.cloudevents import from_kafka
from eventbus.config import load_connectors
from eventbus.targets import KafkaTarget, KafkaTargetSpec, Outcome, build_target
from eventbus.targets import _kafka as kafka_target_module
from tests.fixtures.nats import unique_name
from tests.targets.conftest import read_records


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


def config_for(bootstrap: str, **kw: Any) -> KafkaTargetSpec:
    kw.setdefault("topic", unique_name("target"))
    return KafkaTargetSpec(name="orders", bootstrap_servers=bootstrap, idempotent=False, **kw)


async def deliver_once(config: KafkaTargetSpec, event: dict[str, Any], payload: Any) -> Outcome:
    async with KafkaTarget(config) as target:
        return await target.deliver(event, payload, is_cloudevent=payload is event, attempt=1)


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


async def test_idempotent_producer_on_a_broker_without_it_says_what_to_set(
    kafka_bootstrap: str,
) -> None:
    # Tansu lacks InitProducerId: the default idempotent producer cannot start there. The
    # failure must be an outcome, not an exception, and must not stop the target from closing.
    # It read "UnknownError: [Error -1]", retryable: every event waited a day to be
    # dead-lettered, nothing pointing at the setting.
    config = KafkaTargetSpec(
        name="orders", bootstrap_servers=kafka_bootstrap, topic=unique_name("target")
    )
    event = make_event()
    outcome = await deliver_once(config, event, event)
    assert not outcome.delivered and not outcome.retryable
    assert "needs the target's idempotent: false" in (outcome.error or ""), outcome.error


@pytest.mark.parametrize(
    "exc", [kerr.UnknownError(), kerr.CorruptRecordException(), kerr.for_code(87)()]
)
def test_a_record_the_broker_refuses_without_a_reason_is_not_retried(exc: Exception) -> None:
    # Retried (a schema the record did not match, INVALID_RECORD, which aiokafka has no class
    # for), a few such records kept the target's circuit open for every other event.
    config = KafkaTargetSpec(name="orders", bootstrap_servers="127.0.0.1:9092", topic="t")
    outcome = kafka_target_module._outcome_from_error(exc, 1.0, config)
    assert not outcome.retryable and outcome.status is None
    assert (outcome.error or "").startswith("the broker refused the record ("), outcome.error


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("topic", "", "topic: Value error, a topic is 1-249 characters"),
        ("topic", "has space", "topic: Value error, a topic is"),
        ("topic", "..", "topic: Value error, a topic is"),
        ("topic", "t" * 250, "topic: Value error, a topic is"),
        ("key", "$.data[", "Kafka target 'orders'.*invalid key JSONPath"),
        ("key", "data.customer.id", "Kafka target 'orders'.*must be a JSONPath"),
        ("bootstrap_servers", "", "bootstrap_servers: Value error, must be host:port"),
        ("bootstrap_servers", "a:9092,,b:9092", "bootstrap_servers: Value error, must be"),
    ],
)
def test_bad_config_names_the_target(field: str, value: Any, reason: str, tmp_path: Path) -> None:
    settings: dict[str, Any] = {"bootstrap_servers": "127.0.0.1:9092", "topic": "t"}
    settings[field] = value
    file = tmp_path / "targets.yaml"
    file.write_text(yaml.safe_dump({"targets": [{"name": "orders", "type": "kafka", **settings}]}))
    with pytest.raises(ConfigError, match=reason):
        build_target(load_connectors(file).targets["orders"])


@pytest.mark.parametrize("key", ["$.data.order[?(@ > 1)]", "$.data.order[?@ > 1]"])
def test_a_key_path_with_a_filter_leaves_the_event_as_it_is(key: str) -> None:
    # jsonpath-ng's filter (its parentheses optional) applied to an object replaced it, in the
    # event it searched, by the list of its values: the event every other target delivers.
    config = KafkaTargetSpec(name="orders", bootstrap_servers="127.0.0.1:9092", topic="t", key=key)
    target = KafkaTarget(config)
    event = {"id": "1", "data": {"order": {"a": 2, "b": 0}}}
    assert target._key_path is not None
    found = kafka_target_module._find_key(target._key_path, event, target._key_filters)
    assert found == b"2"
    assert event == {"id": "1", "data": {"order": {"a": 2, "b": 0}}}
