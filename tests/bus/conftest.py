"""Helpers for the bus tests: a config factory per backend, events, and bounded consumption."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from eventbus.bus import BusMessage, KafkaBusConfig, NatsBusConfig
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
