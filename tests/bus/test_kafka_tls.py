"""Kafka over TLS (``security_protocol: SSL`` and ``SASL_SSL``) against a real broker: the bus,
the Kafka target and the Kafka source connect with mutual TLS, and refuse a broker whose
certificate their CA or server name does not vouch for.

Tansu's own TLS options do not work (``--cert`` and ``--key`` cannot be given together), so the
test puts TLS in front of it, as stunnel or an envoy sidecar would: a TLS listener requiring a
client certificate (``tests.fixtures.tls_relay``) relays each connection to Tansu's plaintext
port, and Tansu advertises the relay's port, so every connection the clients open after the
bootstrap (metadata, group coordinator, partition leader) goes through TLS as well.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

import eventbus.sources  # noqa: F401  (registers every connector type)
from eventbus._errors import BusUnavailable
from eventbus.bus import open_bus
from eventbus.config import KafkaSettings
from eventbus.sources import build_source
from eventbus.targets import KafkaTarget, KafkaTargetSpec
from tests.bus.conftest import PATIENCE, event, kafka_config, take
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.kafka import TansuBroker
from tests.fixtures.nats import unique_name
from tests.fixtures.tls_relay import TlsRelay, tls_relay
from tests.sources._harness import Recorder, eventually, make_context, running, source_pool


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class TlsBroker:
    """``bootstrap`` takes TLS with a client certificate only (Tansu advertises it, so the
    test's own clients go through it too, with ``relay.client``)."""

    bootstrap: str
    relay: TlsRelay


@pytest.fixture
async def tls_broker(tansu_binary: str, pki: Pki) -> AsyncIterator[TlsBroker]:
    # The relay listens first, on a port the system gives it, and Tansu then advertises that
    # port. A port chosen free and bound later was once taken in between (a CI run).
    broker = TansuBroker(tansu_binary)
    async with tls_relay(broker.port, pki) as relay:
        broker.advertised_port = relay.port
        broker.start()
        try:
            yield TlsBroker(bootstrap=f"127.0.0.1:{relay.port}", relay=relay)
        finally:
            broker.stop()


def _mutual_tls(pki: Pki, **overrides: Any) -> dict[str, Any]:
    tls = {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}
    return {"security_protocol": "SSL", "tls": tls | overrides}


async def _read(broker: TlsBroker, topic: str, count: int) -> list[Any]:
    reader = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        auto_offset_reset="earliest",
        security_protocol="SSL",
        ssl_context=broker.relay.client,
    )
    await reader.start()
    try:
        partitions = reader.partitions_for_topic(topic) or set()
        reader.assign([TopicPartition(topic, p) for p in partitions] or [TopicPartition(topic, 0)])
        records: list[Any] = []
        async with asyncio.timeout(PATIENCE):
            while len(records) < count:
                for batch in (await reader.getmany(timeout_ms=200)).values():
                    records.extend(batch)
        return records
    finally:
        await reader.stop()


async def test_the_bus_publishes_and_consumes_over_mutual_tls(
    tls_broker: TlsBroker, pki: Pki
) -> None:
    config = kafka_config(tls_broker.bootstrap, auth=KafkaSettings.model_validate(_mutual_tls(pki)))
    async with open_bus(config) as bus:
        await bus.publish_many([event(n) for n in range(10)])
        got = await take(bus.messages(), 10)
        for message in got:
            await message.ack()
    assert sorted(m.event["id"] for m in got) == sorted(f"e-{n}" for n in range(10))
    # producer, consumer and admin connections, each to the bootstrap and then the broker
    assert tls_broker.relay.sessions >= 3


async def test_the_target_delivers_over_mutual_tls(tls_broker: TlsBroker, pki: Pki) -> None:
    topic = unique_name("out")
    spec = KafkaTargetSpec.model_validate(
        {
            "name": "k-tls",
            "bootstrap_servers": tls_broker.bootstrap,
            "topic": topic,
            "idempotent": False,
            "timeout": 10,
            **_mutual_tls(pki),
        }
    )
    sent = event(1)
    async with KafkaTarget(spec) as target:
        outcome = await target.deliver(sent, sent, is_cloudevent=True, attempt=1)
    assert outcome.delivered, outcome.error
    [record] = await _read(tls_broker, topic, 1)
    assert ("ce_id", b"e-1") in list(record.headers)  # binary mode, the target's default
    assert orjson.loads(record.value) == sent["data"]


async def test_the_source_reads_over_mutual_tls(
    tls_broker: TlsBroker, pki: Pki, database_dsn: str
) -> None:
    topic = unique_name("in")
    producer = AIOKafkaProducer(
        bootstrap_servers=tls_broker.bootstrap,
        security_protocol="SSL",
        ssl_context=tls_broker.relay.client,
    )
    await producer.start()
    try:
        for n in range(3):
            await producer.send_and_wait(topic, orjson.dumps(event(n)))
    finally:
        await producer.stop()
    spec = {
        "name": "kin-tls",
        "type": "kafka",
        "bootstrap_servers": tls_broker.bootstrap,
        "topics": [topic],
        **_mutual_tls(pki),
    }
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "kin-tls", recorder)
        async with running(build_source(spec), ctx):
            events = await recorder.wait_for(3)
    assert sorted(e["id"] for e in events) == ["e-0", "e-1", "e-2"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other-ca", "certificate verify failed: self-signed certificate in certificate chain"),
        ("wrong-server-name", "certificate verify failed: Hostname mismatch"),
        ("no-client-cert", "certificate required|reset the connection|closed the connection"),
    ],
)
async def test_the_bus_says_why_tls_failed(
    tls_broker: TlsBroker, pki: Pki, case: str, reason: str
) -> None:
    tls: dict[str, Any] = {
        "other-ca": {"ca": str(pki.other_ca)},
        "wrong-server-name": {"server_name": "elsewhere.test"},
        "no-client-cert": {"cert": None, "key": None},
    }[case]
    config = kafka_config(
        tls_broker.bootstrap,
        connect_timeout=5.0,
        auth=KafkaSettings.model_validate(_mutual_tls(pki, **tls)),
    )
    with pytest.raises(BusUnavailable) as info:
        async with open_bus(config):
            pass
    message = str(info.value)
    assert f"TLS with {tls_broker.bootstrap} failed: " in message
    assert re.search(reason, message), message


async def test_tls_to_a_port_without_it_is_named(kafka_bootstrap: str, pki: Pki) -> None:
    # The broker waits for a request it can read, the handshake for an answer: "Unable to
    # bootstrap", and the reason nowhere.
    config = kafka_config(
        kafka_bootstrap, connect_timeout=5.0, auth=KafkaSettings.model_validate(_mutual_tls(pki))
    )
    with pytest.raises(BusUnavailable) as info:
        async with open_bus(config):
            pass
    message = str(info.value)
    assert f"TLS with {kafka_bootstrap} failed: no answer to the TLS handshake" in message
    assert "is this a port without TLS?" in message, message
    # a target: "timeout after 3s", retried for ever
    spec = KafkaTargetSpec.model_validate(
        {"name": "k", "bootstrap_servers": kafka_bootstrap, "topic": "t", "timeout": "3s"}
        | _mutual_tls(pki)
    )
    sent = event(1)
    async with KafkaTarget(spec) as target:
        outcome = await target.deliver(sent, sent, is_cloudevent=True, attempt=1)
    assert not outcome.delivered and outcome.retryable
    assert "no answer to the TLS handshake" in (outcome.error or ""), outcome.error


async def test_the_target_and_source_say_why_tls_failed(
    tls_broker: TlsBroker, pki: Pki, database_dsn: str
) -> None:
    wrong = _mutual_tls(pki, ca=str(pki.other_ca))
    spec = KafkaTargetSpec.model_validate(
        {"name": "k", "bootstrap_servers": tls_broker.bootstrap, "topic": "t", **wrong}
    )
    sent = event(1)
    async with KafkaTarget(spec) as target:
        outcome = await target.deliver(sent, sent, is_cloudevent=True, attempt=1)
    assert not outcome.delivered and outcome.retryable
    assert "certificate verify failed" in (outcome.error or ""), outcome.error
    source = {
        "name": "kin-ca",
        "type": "kafka",
        "bootstrap_servers": tls_broker.bootstrap,
        "topics": ["t"],
        **wrong,
    }
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "kin-ca", Recorder())

        async def backing_off() -> bool:
            return ctx.status.state == "backoff"

        async with running(build_source(source), ctx):
            await eventually(backing_off)
    assert "certificate verify failed" in (ctx.status.last_error or ""), ctx.status.last_error
