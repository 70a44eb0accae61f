"""The NATS target against a real ``nats-server`` (``nats_url`` fixture, or one of its own).

Core deliveries are checked with a plain subscription, JetStream deliveries by reading the
message back from a stream each test creates.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import StreamConfig

from eventbus._errors import ConfigError
from eventbus.bus import NatsServer
from eventbus.bus._nats_server import free_port
from eventbus.cloudevents import from_nats
from eventbus.targets import NatsTarget, NatsTargetConfig, Outcome
from eventbus.targets._base import MAX_ERROR_CHARS
from tests.fixtures.nats import unique_name
from tests.fixtures.wait import eventually


def make_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/tests/targets",
        "type": "com.example.order.created",
        "datacontenttype": "application/json",
        "subject": "order 7/ü",
        "data": {"order": 7, "total": 12.5},
    }
    event.update(overrides)
    return event


def config_for(url: str, **kw: Any) -> NatsTargetConfig:
    kw.setdefault("subject", f"orders.{unique_name('s')}")
    return NatsTargetConfig(name="orders", url=url, **kw)


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()


async def next_message(sub: Subscription) -> Msg:
    return await sub.next_msg(timeout=5)


async def deliver_once(config: NatsTargetConfig, event: dict[str, Any], payload: Any) -> Outcome:
    async with NatsTarget(config) as target:
        return await target.deliver(event, payload, is_cloudevent=payload is event, attempt=1)


# --- what is sent ---------------------------------------------------------------------------


async def test_structured_mode_is_the_default_and_sends_the_json_event(
    nats_url: str, client: Client
) -> None:
    config = config_for(nats_url)
    sub = await client.subscribe(config.subject)
    event = make_event()
    outcome = await deliver_once(config, event, event)
    assert outcome.delivered and outcome.error is None and outcome.status is None
    assert outcome.duration_ms > 0
    msg = await next_message(sub)
    assert msg.headers == {"Content-Type": "application/cloudevents+json"}
    assert orjson.loads(msg.data) == event
    assert from_nats(msg.headers, msg.data) == event


async def test_binary_mode_sends_ce_headers_and_data(nats_url: str, client: Client) -> None:
    config = config_for(nats_url, mode="binary")
    sub = await client.subscribe(config.subject)
    event = make_event()
    assert (await deliver_once(config, event, event)).delivered
    msg = await next_message(sub)
    assert msg.headers is not None
    assert msg.headers["ce-id"] == "evt-1"
    assert msg.headers["ce-type"] == "com.example.order.created"
    assert msg.headers["ce-specversion"] == "1.0"
    assert msg.headers["ce-datacontenttype"] == "application/json"
    assert orjson.loads(msg.data) == event["data"]
    assert from_nats(msg.headers, msg.data) == event


@pytest.mark.parametrize(
    ("payload", "body", "content_type"),
    [
        ({"order": 7, "items": [1, 2]}, b'{"order":7,"items":[1,2]}', "application/json"),
        (None, b"null", "application/json"),
        ("order 7 shipped", b"order 7 shipped", "text/plain; charset=utf-8"),
    ],
)
async def test_transformed_payload_is_the_body_with_event_identity(
    nats_url: str, client: Client, payload: Any, body: bytes, content_type: str
) -> None:
    config = config_for(nats_url)
    sub = await client.subscribe(config.subject)
    assert (await deliver_once(config, make_event(), payload)).delivered
    msg = await next_message(sub)
    assert msg.data == body
    assert msg.headers == {
        "ce-specversion": "1.0",
        "ce-id": "evt-1",
        "ce-source": "/tests/targets",
        "ce-type": "com.example.order.created",
        "Content-Type": content_type,
    }


async def test_jetstream_message_is_stored(nats_url: str, client: Client) -> None:
    config = config_for(nats_url, jetstream=True)
    stream = unique_name("S")
    js = client.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[config.subject]))
    try:
        event = make_event()
        outcome = await deliver_once(config, event, event)
        assert outcome.delivered, outcome.error
        stored = await js.get_last_msg(stream, config.subject)
        assert stored.headers is not None and stored.data is not None
        assert from_nats(stored.headers, stored.data) == event
    finally:
        await js.delete_stream(stream)


# --- failures -------------------------------------------------------------------------------


async def test_jetstream_without_a_stream_is_retryable_until_one_exists(
    nats_url: str, client: Client
) -> None:
    config = config_for(nats_url, jetstream=True)
    event = make_event()
    async with NatsTarget(config) as target:
        outcome = await target.deliver(event, event, is_cloudevent=True, attempt=1)
        assert not outcome.delivered and outcome.retryable and outcome.status is None
        assert outcome.error is not None and "no JetStream stream" in outcome.error
        assert config.subject in outcome.error
        stream = unique_name("S")
        js = client.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[config.subject]))
        try:
            outcome = await target.deliver(event, event, is_cloudevent=True, attempt=2)
            assert outcome.delivered, outcome.error
            assert (await js.stream_info(stream)).state.messages == 1
        finally:
            await js.delete_stream(stream)


async def test_message_over_stream_limit_is_final(nats_url: str, client: Client) -> None:
    config = config_for(nats_url, jetstream=True)
    stream = unique_name("S")
    js = client.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[config.subject], max_msg_size=256))
    try:
        event = make_event(data={"blob": "x" * 1000})
        outcome = await deliver_once(config, event, event)
        assert not outcome.delivered and not outcome.retryable
        assert outcome.error is not None and "JetStream rejected" in outcome.error
    finally:
        await js.delete_stream(stream)


async def test_message_over_max_payload_is_final_and_target_keeps_working(
    nats_url: str, client: Client
) -> None:
    config = config_for(nats_url)
    sub = await client.subscribe(config.subject)
    huge = make_event(data={"blob": "x" * (2 * 1024 * 1024)})
    event = make_event()
    async with NatsTarget(config) as target:
        outcome = await target.deliver(huge, huge, is_cloudevent=True, attempt=1)
        assert not outcome.delivered and not outcome.retryable
        assert outcome.error is not None and "max_payload" in outcome.error
        assert len(outcome.error) <= MAX_ERROR_CHARS
        assert (await target.deliver(event, event, is_cloudevent=True, attempt=1)).delivered
    assert orjson.loads((await next_message(sub)).data)["id"] == "evt-1"


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
    nats_url: str, event: dict[str, Any], payload: Any, is_cloudevent: bool
) -> None:
    async with NatsTarget(config_for(nats_url)) as target:
        outcome = await target.deliver(event, payload, is_cloudevent=is_cloudevent, attempt=1)
        assert not outcome.delivered and not outcome.retryable
        assert outcome.error is not None and outcome.error.startswith("cannot build the message")
        good = make_event()
        assert (await target.deliver(good, good, is_cloudevent=True, attempt=1)).delivered


@pytest.mark.parametrize("jetstream", [False, True], ids=["core", "jetstream"])
async def test_server_down_is_retryable_and_target_recovers(
    tmp_path: Path, jetstream: bool
) -> None:
    server = NatsServer(tmp_path, port=free_port())  # the port is closed until start()
    config = config_for(server.url, jetstream=jetstream)
    event = make_event()
    try:
        async with NatsTarget(config) as target:
            outcome = await target.deliver(event, event, is_cloudevent=True, attempt=1)
            assert not outcome.delivered and outcome.retryable and outcome.status is None
            assert outcome.error is not None and server.display_url in outcome.error
            assert server.url not in outcome.error  # the password is masked

            await server.start()
            nc = await nats.connect(server.url)
            try:
                if jetstream:
                    js = nc.jetstream()
                    await js.add_stream(
                        StreamConfig(name=unique_name("S"), subjects=[config.subject])
                    )
                sub = await nc.subscribe(config.subject)
                outcome = await target.deliver(event, event, is_cloudevent=True, attempt=2)
                assert outcome.delivered, outcome.error
                assert orjson.loads((await next_message(sub)).data)["id"] == "evt-1"
            finally:
                await nc.close()

            await server.stop()
            outcome = await target.deliver(event, event, is_cloudevent=True, attempt=3)
            assert not outcome.delivered and outcome.retryable

            await server.start()
            outcome = await target.deliver(event, event, is_cloudevent=True, attempt=4)
            assert outcome.delivered, outcome.error
    finally:
        await server.stop()


async def test_concurrent_deliveries_while_down_share_one_connect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = config_for(f"nats://127.0.0.1:{free_port()}")
    event = make_event()
    with caplog.at_level(logging.WARNING, logger="eventbus.targets._nats"):
        async with NatsTarget(config) as target:
            outcomes = await asyncio.gather(
                *(target.deliver(event, event, is_cloudevent=True, attempt=1) for _ in range(20))
            )
    assert all(not o.delivered and o.retryable for o in outcomes)
    assert len({o.error for o in outcomes}) == 1
    # The connect begun on open is still in progress when they arrive: all of them wait for it.
    assert sum("cannot connect" in r.getMessage() for r in caplog.records) == 1


async def test_rejected_credentials_are_final(tmp_path: Path) -> None:
    binary = shutil.which("nats-server")
    assert binary is not None
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "--auth",
        "s3cret",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        event = make_event()
        config = config_for(f"nats://127.0.0.1:{port}", timeout=2.0)

        async def answered() -> Outcome | None:
            outcome = await deliver_once(config, event, event)
            # until it listens: a refused connect is a retryable outcome
            return None if outcome.retryable else outcome

        outcome = await eventually(answered, within=10, every=0.05, what="nats-server listening")
        assert not outcome.delivered and not outcome.retryable
        assert outcome.error is not None and "authorization failed" in outcome.error
        token_config = config_for(f"nats://s3cret@127.0.0.1:{port}")
        assert (await deliver_once(token_config, event, event)).delivered
    finally:
        proc.terminate()
        await proc.wait()


# --- contract -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("subject", "", "subject must be"),
        ("subject", "orders.*", "subject must be"),
        ("subject", "orders.>", "subject must be"),
        ("subject", "orders..created", "subject must be"),
        ("subject", "orders created", "subject must be"),
        ("subject", ".orders", "subject must be"),
        ("url", "", "url must be"),
        ("url", "http://127.0.0.1:4222", "url must be"),
        ("url", "nats://127.0.0.1:4222,", "url must be"),
        ("url", "nats://127.0.0.1:99999", "invalid url"),
        ("mode", "batched", "mode must be"),
        ("timeout", 0, "timeout must be"),
    ],
)
def test_bad_config_names_the_target(field: str, value: Any, reason: str) -> None:
    settings: dict[str, Any] = {"url": "nats://127.0.0.1:4222", "subject": "orders.created"}
    settings[field] = value
    with pytest.raises(ConfigError, match=rf"NATS target 'orders'.*{reason}"):
        NatsTarget(NatsTargetConfig(name="orders", **settings))


def test_several_server_urls_are_accepted() -> None:
    config = NatsTargetConfig(
        name="orders", url="nats://127.0.0.1:4222, tls://127.0.0.1:4223", subject="a.b-c_d"
    )
    assert NatsTarget(config).name == "orders"


async def test_deliver_outside_context_raises() -> None:
    target = NatsTarget(NatsTargetConfig(name="o", url="nats://127.0.0.1:1", subject="s"))
    event = make_event()
    with pytest.raises(RuntimeError, match="not open"):
        await target.deliver(event, event, is_cloudevent=True, attempt=1)


async def test_opening_twice_raises_and_target_reopens_after_close(nats_url: str) -> None:
    target = NatsTarget(config_for(nats_url))
    event = make_event()
    async with target:
        with pytest.raises(RuntimeError, match="already open"):
            await target.__aenter__()
        assert (await target.deliver(event, event, is_cloudevent=True, attempt=1)).delivered
    async with target:
        assert (await target.deliver(event, event, is_cloudevent=True, attempt=2)).delivered
