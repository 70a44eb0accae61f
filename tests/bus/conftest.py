"""Helpers for the bus tests: a config factory per backend, a broker of the test's own per
backend (to take down), events, and bounded consumption."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio

from eventbus.bus import BusMessage, KafkaBusConfig, NatsBusConfig, NatsServer, bus_message_limit
from tests.fixtures.kafka import TansuBroker
from tests.fixtures.nats import unique_name

BusConfig = NatsBusConfig | KafkaBusConfig
MakeConfig = Callable[..., BusConfig]

# Upper bound for any wait on the broker in these tests; never reached when things work.
PATIENCE = 30.0


def nats_config(url: str, **overrides: Any) -> NatsBusConfig:
    stream = unique_name("S")
    settings: dict[str, Any] = {
        "url": url,
        "stream": stream,
        "subject": f"{stream}.events",
        "durable": unique_name("d"),
        "fetch_timeout": 0.2,
        "publish_timeout": 2.0,
        "connect_timeout": 2.0,
    }
    settings.update(overrides)
    return NatsBusConfig(**settings)


def kafka_config(bootstrap: str, **overrides: Any) -> KafkaBusConfig:
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "topic": unique_name("t"),
        "group_id": unique_name("g"),
        "partitions": 4,
        "idempotent": False,
        "session_timeout": 2.0,
        "poll_timeout": 0.2,
        "commit_interval": 0.2,
        "publish_timeout": 2.0,
        "connect_timeout": 5.0,
    }
    settings.update(overrides)
    return KafkaBusConfig(**settings)


@pytest.fixture(params=["nats", "kafka"])
def make_config(request: pytest.FixtureRequest) -> MakeConfig:
    """``make_config(**overrides)``: a config for this test's own stream/topic and durable/group.

    Every call returns a config with the same names, so two buses made from it share the work.
    """
    if request.param == "nats":
        base: BusConfig = nats_config(request.getfixturevalue("nats_url"))
    else:
        base = kafka_config(request.getfixturevalue("kafka_bootstrap"))

    def make(**overrides: Any) -> BusConfig:
        settings = {name: getattr(base, name) for name in base.__dataclass_fields__}
        settings.update(overrides)
        return type(base)(**settings)

    return make


class OwnBroker(Protocol):
    """A broker of one backend that only this test uses, so it may stop and start it."""

    keeps_messages: bool
    """Whether what the broker stored is still there after it starts again."""

    def config(self, **overrides: Any) -> BusConfig:
        """A bus config for this broker, on stream/topic names no other config has."""

    async def stop(self) -> None:
        """Take the broker down: connections to it are refused."""

    async def start(self) -> None:
        """Bring it back on the same address."""


class _OwnNats:
    keeps_messages = True  # JetStream file storage

    def __init__(self, store: Path) -> None:
        # as ``eventbus serve`` starts it, for a bus of up to 1 MiB events
        self.server = NatsServer(store, max_payload=bus_message_limit(1 << 20))

    def config(self, **overrides: Any) -> BusConfig:
        return nats_config(self.server.url, **overrides)

    async def stop(self) -> None:
        await self.server.stop()

    async def start(self) -> None:
        await self.server.start()


class _OwnKafka:
    keeps_messages = False  # Tansu's memory storage

    def __init__(self, broker: TansuBroker) -> None:
        self.broker = broker

    def config(self, **overrides: Any) -> BusConfig:
        return kafka_config(self.broker.bootstrap, **overrides)

    async def stop(self) -> None:
        self.broker.stop()

    async def start(self) -> None:
        self.broker.start()


@pytest_asyncio.fixture(params=["nats", "kafka"])
async def own_broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OwnBroker]:
    """A started broker of each backend, the test's own, stopped at the end of the test."""
    broker: _OwnNats | _OwnKafka
    if request.param == "nats":
        broker = _OwnNats(tmp_path / "nats")
    else:
        broker = _OwnKafka(TansuBroker(request.getfixturevalue("tansu_binary")))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def event(n: int, *, source: str = "/tests/bus", **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"e-{n}",
        "source": source,
        "type": "test.bus",
        "data": {"n": n},
        **extra,
    }


async def take(messages: AsyncIterator[BusMessage], n: int) -> list[BusMessage]:
    """The next ``n`` messages; fails the test if they do not arrive within PATIENCE."""
    got: list[BusMessage] = []
    async with asyncio.timeout(PATIENCE):
        while len(got) < n:
            got.append(await anext(messages))
    return got


async def take_until(
    messages: AsyncIterator[BusMessage], wanted: set[str], *, ack: bool = True
) -> list[BusMessage]:
    """Messages until every id in ``wanted`` was seen (acking each if ``ack``), within PATIENCE."""
    got: list[BusMessage] = []
    missing = set(wanted)
    async with asyncio.timeout(PATIENCE):
        while missing:
            msg = await anext(messages)
            got.append(msg)
            missing.discard(msg.event["id"])
            if ack:
                await msg.ack()
    return got
