"""End to end with Kafka as the bus (Tansu, a real Kafka-protocol broker): publish over HTTP
and over Kafka (CloudEvents Kafka binding, binary and structured), the function receives
exactly the routed events, the audit trail shows them."""

from __future__ import annotations

import logging

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from eventbus.cloudevents import to_kafka
from tests.fixtures.nats import unique_name
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import StartService

RULES = """
- name: images
  match:
    type: [com.example.image.uploaded]
    subject: [{suffix: .png}]
  targets: [fn]
"""


@pytest.mark.timeout(120)
async def test_kafka_bus_with_http_and_kafka_ingest(
    eventbus: StartService,
    receiver: Receiver,
    kafka_bootstrap: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="eventbus")
    ingest_topic = unique_name("ingest")
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        kafka_bootstrap=kafka_bootstrap,
        settings={
            "kafka_ingest": {
                "bootstrap_servers": kafka_bootstrap,
                "topics": [ingest_topic],
                "group_id": unique_name("ingest-group"),
                "session_timeout": 2,  # Tansu holds each group join for about half of it
            }
        },
    )

    # the ingest is a source like the connectors' (here there are none)
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eventbus ready")]
    assert ready == ["eventbus ready: 1 rules, 1 targets, 1 sources, bus=kafka"]
    assert [(s.name, s.type) for s in svc.service.source_statuses()] == [("kafka-ingest", "kafka")]

    def ev(i: str, subject: str) -> dict[str, object]:
        return {
            "specversion": "1.0",
            "id": i,
            "source": "tests/kafka",
            "type": "com.example.image.uploaded",
            "subject": subject,
            "data": {"n": i},
        }

    status, _ = await svc.post_event(ev("h1", "a.png"))
    assert status == 202
    status, _ = await svc.post_event(ev("h2", "a.jpg"))  # not routed
    assert status == 202

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for event, structured in (
            (ev("k1", "b.png"), False),
            (ev("k2", "c.png"), True),
            (ev("k3", "c.gif"), False),
        ):
            key, headers, value = to_kafka(event, structured=structured)
            await producer.send_and_wait(ingest_topic, value, key=key, headers=headers)
        # a message that is no CloudEvent is kept as a source dead letter; the stream goes on
        await producer.send_and_wait(ingest_topic, b"not an event")
        value, key, headers = _after()
        await producer.send_and_wait(ingest_topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

    got = await receiver.wait_for(4, path="/fn", timeout=60)
    # Every event is on the bus (the source published k3, which no rule routes: its trail
    # exists), and the router is done with all of them: no other delivery to /fn is on its way.
    await svc.trail("tests/kafka", "k3")
    await svc.drained()
    ids = sorted(r.cloudevent["id"] for r in receiver.requests)
    assert ids == ["h1", "k1", "k2", "k4"]
    k1 = next(r for r in got if r.cloudevent["id"] == "k1")
    assert k1.cloudevent["subject"] == "b.png" and k1.cloudevent["data"] == {"n": "k1"}

    await svc.service.store.audit.flush()
    status, _, trail = await svc.request("GET", "/events/trail?source=tests/kafka&id=k1")
    assert status == 200 and trail["via"] == "source:kafka-ingest"
    assert [a["outcome"] for a in trail["attempts"]] == ["delivered"]
    status, _, dead = await svc.request("GET", "/sources/dead-letters?source=kafka-ingest")
    assert status == 200 and len(dead["items"]) == 1


def _after() -> tuple[bytes, None, list[tuple[str, bytes]]]:
    event = {
        "specversion": "1.0",
        "id": "k4",
        "source": "tests/kafka",
        "type": "com.example.image.uploaded",
        "subject": "d.png",
    }
    return orjson.dumps(event), None, [("content-type", b"application/cloudevents+json")]
