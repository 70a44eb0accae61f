"""The NATS target against a real ``nats-server`` (``nats_url`` fixture, or one of its own).

Core deliveries are checked with a plain subscription, JetStream deliveries by reading the
message back from a stream each test creates. What every target does (lifecycle, timeouts,
refusals, outcomes) is test_contract.py.
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
from eventbus.bus._nats_server import free_port
from eventbus.cloudevents import from_nats
from eventbus.targets import NatsTarget, NatsTargetSpec, Outcome
from tests.fixtures.nats import configured_nats_server, unique_name
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


def config_for(url: str, **kw: Any) -> NatsTargetSpec:
    kw.setdefault("subject", f"orders.{unique_name('s')}")
    return NatsTargetSpec(name="orders", url=url, **kw)


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()


async def next_message(sub: Subscription) -> Msg:
    return await sub.next_msg(timeout=5)


async def deliver_once(config: NatsTargetSpec, event: dict[str, Any], payload: Any) -> Outcome:
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


async def test_a_jetstream_delivery_sent_again_is_stored_once(
    nats_url: str, client: Client
) -> None:
    # No Nats-Msg-Id: each attempt a frozen server had taken before the timeout was stored
    # (460 messages for 300 events in a review), though the stream removes repeats itself.
    config = config_for(nats_url, jetstream=True)
    stream = unique_name("S")
    js = client.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[config.subject]))
    try:
        event = make_event()
        # a retry's event as the database's jsonb gives it back: its keys in another order
        reread = {k: dict(reversed(v.items())) if k == "data" else v for k, v in event.items()}
        reread = dict(reversed(reread.items()))
        assert orjson.dumps(reread) != orjson.dumps(event)
        async with NatsTarget(config) as target:
            # the first stored, its acknowledgement lost: sent again, as it was and as a retry
            for attempt, sent in ((1, event), (2, event), (3, reread)):
                outcome = await target.deliver(sent, sent, is_cloudevent=True, attempt=attempt)
                assert outcome.delivered, outcome.error
            # another rule's transform of the same event is a message of its own
            outcome = await target.deliver(event, {"n": 7}, is_cloudevent=False, attempt=1)
            assert outcome.delivered, outcome.error
        # another target whose subject the same stream captures: its own message too
        other = config_for(nats_url, jetstream=True, subject=config.subject + ".audit")
        await js.update_stream(
            StreamConfig(name=stream, subjects=[config.subject + ".>", config.subject])
        )
        outcome = await deliver_once(other.model_copy(update={"name": "audit"}), event, event)
        assert outcome.delivered, outcome.error
        info = await js.stream_info(stream)
        assert info.state.messages == 3
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


async def test_a_publish_the_server_refuses_is_not_delivered(tmp_path: Path) -> None:
    # Core NATS reports a denied publish only as an -ERR: the attempt was "delivered" (a sync
    # invocation answered 200) and the message lost, a warning in the log its only trace.
    config = """
authorization { users: [
  {user: pub, password: "pub-password-0001",
   permissions: {publish: {allow: [">"], deny: ["denied.>"]}, subscribe: {allow: [">"]}}}
] }
"""
    async with configured_nats_server(tmp_path / "nats", config) as port:
        url = f"nats://pub:pub-password-0001@127.0.0.1:{port}"
        event = make_event()
        async with NatsTarget(config_for(url, subject="denied.orders")) as denied:
            for attempt in (1, 2):  # each on the same connection
                outcome = await denied.deliver(event, event, is_cloudevent=True, attempt=attempt)
                assert not outcome.delivered and not outcome.retryable, outcome
                assert "permissions violation for publish" in (outcome.error or "")
        assert (
            await deliver_once(config_for(url, subject="allowed.orders"), event, event)
        ).delivered


async def test_a_jetstream_publish_the_server_refuses_is_final_at_once(tmp_path: Path) -> None:
    # The server answers a publish the user may not make with an -ERR on the connection, not
    # on the publish: the JetStream publish waited for its acknowledgement until the timeout,
    # a retryable failure (retried for a day, then dead-lettered as timed out; a sync call 504)
    config = """
jetstream { store_dir: "{store}" }
authorization { users: [
  {user: admin, password: "admin-password-0001"},
  {user: pub, password: "pub-password-0001",
   permissions: {publish: {allow: ["$JS.API.>", "_INBOX.>"], deny: ["denied.>"]},
                 subscribe: {allow: ["_INBOX.>"]}}}
] }
"""
    async with configured_nats_server(tmp_path / "nats", config) as port:
        admin = await nats.connect(f"nats://admin:admin-password-0001@127.0.0.1:{port}")
        try:
            await admin.jetstream().add_stream(StreamConfig(name="DENIED", subjects=["denied.>"]))
        finally:
            await admin.close()
        url = f"nats://pub:pub-password-0001@127.0.0.1:{port}"
        event = make_event()
        spec = config_for(url, subject="denied.orders", jetstream=True, timeout=10.0)
        async with NatsTarget(spec) as denied:
            for attempt in (1, 2):  # each on the same connection
                outcome = await denied.deliver(event, event, is_cloudevent=True, attempt=attempt)
                assert not outcome.delivered and not outcome.retryable, outcome
                assert "permissions violation for publish" in (outcome.error or "")
                assert outcome.duration_ms < 5_000, outcome
            answer = await denied.request(event, event, is_cloudevent=True)
            assert not answer.outcome.retryable and answer.outcome.duration_ms < 5_000, answer


async def test_a_server_lost_mid_request_fails_at_once_not_at_the_timeout(
    tmp_path: Path,
) -> None:
    binary = shutil.which("nats-server")
    assert binary is not None
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, "-a", "127.0.0.1", "-p", str(port), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        url = f"nats://127.0.0.1:{port}"

        async def connected() -> Client | None:
            try:
                return await nats.connect(url, allow_reconnect=False)
            except (OSError, nats.errors.Error):
                return None

        responder = await eventually(connected, within=10, every=0.05, what="nats-server up")
        config = config_for(url, timeout=30.0)
        asked = asyncio.Event()

        async def never_answers(msg: Msg) -> None:
            asked.set()

        await responder.subscribe(config.subject, cb=never_answers)
        await responder.flush()
        event = make_event()
        async with NatsTarget(config) as target:
            request = asyncio.create_task(target.request(event, event, is_cloudevent=True))
            await asyncio.wait_for(asked.wait(), 10)
            proc.kill()
            async with asyncio.timeout(10):  # was the whole 30 s, reported as a timeout
                answer = await request
        outcome = answer.outcome
        assert not outcome.delivered and outcome.retryable and not outcome.timed_out, outcome
        assert outcome.error is not None and "cannot reach NATS" in outcome.error
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# --- configuration --------------------------------------------------------------------------


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
    ],
)
def test_bad_config_names_the_target(field: str, value: Any, reason: str) -> None:
    settings: dict[str, Any] = {"url": "nats://127.0.0.1:4222", "subject": "orders.created"}
    settings[field] = value
    with pytest.raises(ConfigError, match=rf"NATS target 'orders'.*{reason}"):
        NatsTarget(NatsTargetSpec(name="orders", **settings))


def test_several_server_urls_are_accepted() -> None:
    config = NatsTargetSpec(
        name="orders", url="nats://127.0.0.1:4222, tls://127.0.0.1:4223", subject="a.b-c_d"
    )
    assert NatsTarget(config).name == "orders"


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_a_message_whose_headers_take_it_past_max_payload_is_final_not_a_lost_server(
    tmp_path: Path, mode: str
) -> None:
    # nats-py checks the body alone against max_payload; the server counts the headers too
    # and answers a larger message by closing the connection: the outcome read "cannot reach
    # NATS" and was retried, each retry closing the connection again.
    limit = 2048
    async with configured_nats_server(tmp_path / "nats", f"max_payload: {limit}") as port:
        spec = config_for(f"nats://127.0.0.1:{port}", mode=mode, timeout=5.0)
        sub_client = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            sub = await sub_client.subscribe(spec.subject)
            await sub_client.flush()
            outcomes: list[tuple[int, Outcome]] = []
            async with NatsTarget(spec) as target:
                for size in range(limit - 400, limit + 1):
                    event = make_event(id=f"evt-{size}", data="x" * size)
                    outcome = await target.deliver(event, event, is_cloudevent=True, attempt=1)
                    outcomes.append((size, outcome))
                small = make_event(id="evt-small")
                after = await target.deliver(small, small, is_cloudevent=True, attempt=1)
                answer = await target.request(event, event, is_cloudevent=True)
            delivered = [size for size, outcome in outcomes if outcome.delivered]
            refused = [(size, o) for size, o in outcomes if not o.delivered]
            assert delivered and refused, outcomes
            assert max(delivered) < refused[0][0], "the sizes that fit come first"
            for _, outcome in refused:
                assert not outcome.retryable, outcome
                assert f"max_payload ({limit} bytes)" in (outcome.error or ""), outcome
            # the first size refused is one byte over the limit, headers counted as sent
            first = refused[0][1].error or ""
            sizes = [int(word) for word in first.split() if word.isdigit()]
            assert sum(sizes[:2]) == limit + 1, first
            assert after.delivered, after  # the connection was not closed under the target
            assert not answer.outcome.retryable and "max_payload" in (answer.outcome.error or "")
            for _ in delivered:
                await next_message(sub)
            assert (await next_message(sub)).headers is not None or mode == "structured"
        finally:
            await sub_client.close()
