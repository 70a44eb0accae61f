"""Kafka topic and NATS subject targets through the whole service: routed events arrive with
the protocol binding, and a broker that is down gets the same retries and dead letters as an
HTTP function."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from aiokafka import AIOKafkaConsumer

from eventbus.cloudevents import from_kafka, from_nats
from tests.fixtures.nats import unique_name
from tests.fixtures.service import StartService, free_port
from tests.fixtures.wait import eventually

RULES = """
- name: to-kafka
  match: {type: [k]}
  targets: [topic]
- name: to-nats
  match: {type: [n]}
  targets: [subject]
- name: to-nowhere
  match: {type: [x]}
  targets: [down]
"""


@pytest.mark.timeout(120)
async def test_kafka_and_nats_targets(
    eventbus: StartService, kafka_bootstrap: str, nats_url: str
) -> None:
    topic, subject = unique_name("out"), unique_name("out")
    fast = {"retry": {"strategy": "fixed", "initial_delay": "100ms", "max_attempts": 2}}
    targets: list[dict[str, Any]] = [
        {
            "name": "topic",
            "type": "kafka",
            "bootstrap_servers": kafka_bootstrap,
            "topic": topic,
            "key": "$.data.customer",
            "idempotent": False,
        },
        {"name": "subject", "type": "nats", "url": nats_url, "subject": subject},
        {
            "name": "down",
            "type": "nats",
            "url": f"nats://127.0.0.1:{free_port()}",
            "subject": "nowhere",
            "timeout": 1,
            "delivery": fast,
        },
    ]
    svc = await eventbus(rules=RULES, targets=targets)
    nc = await nats.connect(nats_url)
    sub = await nc.subscribe(subject)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=unique_name("g"),
        # Tansu holds a group join for half the session timeout: 1 s, not the default's 5 s
        session_timeout_ms=2000,
        heartbeat_interval_ms=666,
    )
    await consumer.start()
    try:

        def ev(i: str, t: str) -> dict[str, Any]:
            return {
                "specversion": "1.0",
                "id": i,
                "source": "tests/brokers",
                "type": t,
                "data": {"customer": "c-7"},
            }

        for event in (ev("k1", "k"), ev("n1", "n"), ev("x1", "x")):
            assert (await svc.post_event(event))[0] == 202

        msg = await sub.next_msg(timeout=20)
        got = from_nats(msg.headers, msg.data)
        assert got["id"] == "n1" and got["data"] == {"customer": "c-7"}

        record = await asyncio.wait_for(consumer.getone(), 30)
        assert record.key == b"c-7"
        got = from_kafka(record.headers, record.key, record.value)
        assert got["id"] == "k1" and got["type"] == "k"

        async def dead_letters() -> list[dict[str, Any]]:
            _status, _, body = await svc.request("GET", "/dead-letters?target=down")
            return list(body["items"])

        (dead,) = await eventually(dead_letters, within=10, every=0.1, what="the dead letter")
        assert dead["event_id"] == "x1" and dead["reason"] == "attempts-exhausted"
        assert dead["attempts"] == 2 and dead["final_error"]
    finally:
        await consumer.stop()
        await nc.close()
