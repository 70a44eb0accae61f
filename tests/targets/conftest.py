"""The target contract's kits: every target type (HTTP, Kafka, NATS core, NATS JetStream) with an
endpoint of its own, a real server the test may take down, bring back on the same address, or
freeze; plus reading back what the endpoint received, decoded with the protocol's binding.

``kit`` is parametrized over the four types, so a test written once against :class:`Kit` runs
against each (``test_contract.py``), as ``tests/bus/test_contract.py`` does for the bus.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import nats
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js.api import StreamConfig

from eventbus.bus import NatsServer
from eventbus.bus._nats_server import free_port
from eventbus.cloudevents import from_kafka, from_nats
from eventbus.targets import (
    HttpTarget,
    HttpTargetSpec,
    KafkaTarget,
    KafkaTargetSpec,
    NatsTarget,
    NatsTargetSpec,
    Target,
)
from tests.fixtures.kafka import TansuBroker
from tests.fixtures.nats import unique_name
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.wait import eventually, frozen

NAME = "contract"
"""Every kit's target has this name: errors about it must say it."""

# Upper bound for any wait on an endpoint in these tests; never reached when things work.
PATIENCE = 10.0


def event(n: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"evt-{n}",
        "source": "/tests/targets",
        "type": "com.example.contract",
        "datacontenttype": "application/json",
        "data": {"n": n},
        **extra,
    }


class Kit(Protocol):
    """One target type and its endpoint, started by the ``kit`` fixture."""

    kind: str
    """The ``kit`` parameter: http, kafka, nats or jetstream."""
    address: str
    """How the target's errors name the endpoint (credentials masked)."""
    secret: str | None
    """A credential in the target's configuration that no error may show."""
    delivered_status: int | None
    """``Outcome.status`` of a delivered attempt (None: the protocol has no status)."""

    def target(self, **overrides: Any) -> Target:
        """A target of this type for the endpoint, not yet open (``timeout``, ``mode``...
        overridden); raises what the type raises for a bad config."""

    async def up(self) -> None:
        """Start the endpoint (again, on the same address)."""

    async def down(self) -> None:
        """Stop the endpoint: connections to it are refused."""

    def hung(self) -> contextlib.AbstractAsyncContextManager[None]:
        """While entered, the endpoint takes the next message and never answers it."""

    def refusing(self) -> dict[str, Any]:
        """An event the endpoint refuses for good (for a function: its next answer says so)."""

    async def received(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` messages the endpoint got since it last came up, decoded with the
        protocol's binding; fails the test if they do not arrive within PATIENCE."""


class HttpKit:
    kind = "http"
    delivered_status: int | None = 204
    secret: str | None = None

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.address = urlsplit(receiver.url()).netloc

    def config(self, **overrides: Any) -> HttpTargetSpec:
        return HttpTargetSpec(name=NAME, url=self.receiver.url("/fn"), **overrides)

    def target(self, **overrides: Any) -> Target:
        return HttpTarget(self.config(**overrides))

    async def up(self) -> None:
        await self.receiver.start()

    async def down(self) -> None:
        await self.receiver.stop()

    @contextlib.asynccontextmanager
    async def hung(self) -> AsyncIterator[None]:
        self.receiver.script(Response(204, delay=3600))
        yield

    def refusing(self) -> dict[str, Any]:
        self.receiver.script(Response(413, body=b"payload too large"))
        return event(99)

    async def received(self, count: int) -> list[dict[str, Any]]:
        got = await self.receiver.wait_for(count, timeout=PATIENCE)
        assert all(r.cloudevent is not None for r in got), [r.parse_error for r in got]
        return [r.cloudevent for r in got[:count] if r.cloudevent is not None]


async def read_records(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord[Any, Any]]:
    """The first ``count`` records of ``topic``; fails after a bounded number of polls."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    records: list[ConsumerRecord[Any, Any]] = []
    try:
        for _ in range(int(PATIENCE / 0.25)):
            batches = await consumer.getmany(timeout_ms=250)
            for batch in batches.values():
                records.extend(batch)
            if len(records) >= count:
                return records[:count]
    finally:
        await consumer.stop()
    raise AssertionError(f"read {len(records)} of {count} records from {topic}")


class KafkaKit:
    """Tansu's memory storage starts empty when it comes up again and, unlike Kafka, acknowledges
    records for a topic it no longer has: what a restarted broker got cannot be read back."""

    kind = "kafka"
    delivered_status: int | None = None
    secret: str | None = None

    def __init__(self, broker: TansuBroker) -> None:
        self.broker = broker
        self.address = broker.bootstrap
        self.topic = unique_name("target")

    def config(self, **overrides: Any) -> KafkaTargetSpec:
        # Tansu has no InitProducerId: the default idempotent producer cannot start there.
        settings: dict[str, Any] = {"topic": self.topic, "idempotent": False, **overrides}
        return KafkaTargetSpec(name=NAME, bootstrap_servers=self.broker.bootstrap, **settings)

    def target(self, **overrides: Any) -> Target:
        return KafkaTarget(self.config(**overrides))

    async def up(self) -> None:
        self.broker.start()  # same port; Tansu's memory storage starts empty

    async def down(self) -> None:
        self.broker.stop()

    def hung(self) -> contextlib.AbstractAsyncContextManager[None]:
        return frozen(self.broker.pid)

    def refusing(self) -> dict[str, Any]:
        return event(99, data={"blob": "x" * (2 * 1024 * 1024)})  # over the 1 MiB request limit

    async def received(self, count: int) -> list[dict[str, Any]]:
        records = await read_records(self.broker.bootstrap, self.topic, count)
        return [from_kafka(r.headers, r.key, r.value) for r in records]


class NatsKit:
    """Core NATS or JetStream (``jetstream``) on a ``nats-server`` of its own; a JetStream kit
    keeps a stream on the subject (file storage: it survives restarts), a core kit a
    subscription made anew each time the server comes up (core NATS drops what nobody hears)."""

    delivered_status: int | None = None
    STREAM_LIMIT = 64 * 1024
    """The stream's max_msg_size: a JetStream kit's server refuses larger messages."""

    def __init__(self, store: Path, *, jetstream: bool) -> None:
        self.server = NatsServer(store, port=free_port())
        self.jetstream = jetstream
        self.kind = "jetstream" if jetstream else "nats"
        self.address = self.server.display_url
        self.secret = urlsplit(self.server.url).password
        self.subject = f"contract.{unique_name('s')}"
        self.stream = unique_name("S")
        self._client: Client | None = None
        self._sub: Subscription | None = None

    def config(self, **overrides: Any) -> NatsTargetSpec:
        return NatsTargetSpec(
            name=NAME,
            url=self.server.url,
            subject=self.subject,
            jetstream=self.jetstream,
            **overrides,
        )

    def target(self, **overrides: Any) -> Target:
        return NatsTarget(self.config(**overrides))

    async def up(self) -> None:
        await self.server.start()
        self._client = await nats.connect(self.server.url)
        if self.jetstream:
            stream = StreamConfig(
                name=self.stream, subjects=[self.subject], max_msg_size=self.STREAM_LIMIT
            )
            await self._client.jetstream().add_stream(stream)  # as it was, if it exists
        else:
            self._sub = await self._client.subscribe(self.subject)
            await self._client.flush()  # subscribed on the server before anything is sent

    async def down(self) -> None:
        client, self._client, self._sub = self._client, None, None
        if client is not None:
            await client.close()
        await self.server.stop()

    def hung(self) -> contextlib.AbstractAsyncContextManager[None]:
        return frozen(int((self.server.store_dir / "nats-server.pid").read_text()))

    def refusing(self) -> dict[str, Any]:
        # JetStream: over the stream's limit, under the server's max_payload (1 MiB), so the
        # stream is what refuses it; core NATS: over max_payload.
        size = 2 * self.STREAM_LIMIT if self.jetstream else 2 * 1024 * 1024
        return event(99, data={"blob": "x" * size})

    async def received(self, count: int) -> list[dict[str, Any]]:
        assert self._client is not None, "the endpoint is down"
        if not self.jetstream:
            assert self._sub is not None
            msgs = [await self._sub.next_msg(timeout=PATIENCE) for _ in range(count)]
            return [from_nats(m.headers, m.data) for m in msgs]
        js = self._client.jetstream()

        async def stored() -> bool:
            return (await js.stream_info(self.stream)).state.messages >= count

        await eventually(stored, within=PATIENCE, what=f"{count} messages stored")
        first = (await js.stream_info(self.stream)).state.first_seq
        out = []
        for seq in range(first, first + count):
            msg = await js.get_msg(self.stream, seq)
            out.append(from_nats(msg.headers, msg.data or b""))
        return out


@pytest_asyncio.fixture(params=["http", "kafka", "nats", "jetstream"])
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kit]:
    """A started endpoint of one target type, its own, stopped at the end of the test."""
    if request.param == "http":
        async with Receiver() as receiver:
            yield HttpKit(receiver)
    elif request.param == "kafka":
        broker = TansuBroker(request.getfixturevalue("tansu_binary"))
        broker.start()
        try:
            yield KafkaKit(broker)
        finally:
            broker.stop()
    else:
        nats_kit = NatsKit(tmp_path / "nats", jetstream=request.param == "jetstream")
        await nats_kit.up()
        try:
            yield nats_kit
        finally:
            await nats_kit.down()
