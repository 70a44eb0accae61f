"""The mqtt source against the Mosquitto on this machine (127.0.0.1:1883), real Postgres and
the real bus. Skipped, with the reason, when that broker is not reachable."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from eventbus._errors import ConfigError
from eventbus.sources import SourceContext, build_source
from eventbus.sources import _mqtt as mqtt_module
from eventbus.sources._mqtt import MqttSource
from tests.fixtures.nats import unique_name
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import ServeProcess
from tests.fixtures.wait import eventually
from tests.sources._harness import dead_letters, running, source_pool
from tests.sources.test_queue_support import BusTap, bus_tap, context


def _reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _reachable(), reason="no MQTT broker (Mosquitto) on 127.0.0.1:1883 on this machine"
)


@contextlib.asynccontextmanager
async def publisher() -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=unique_name("pub")) as client:
        yield client


@contextlib.asynccontextmanager
async def session(name: str) -> AsyncIterator[str]:
    """A source name whose broker-side persistent session is removed afterwards."""
    try:
        yield name
    finally:
        # Connecting once with a clean session discards what the broker kept for the client.
        async with aiomqtt.Client(
            "127.0.0.1", 1883, identifier=f"eventbus-source-{name}", clean_session=True
        ):
            pass


@contextlib.asynccontextmanager
async def _rig(
    database_dsn: str, nats_url: str
) -> AsyncIterator[tuple[str, Any, BusTap, aiomqtt.Client, SourceContext]]:
    """A source name with its broker session removed afterwards, the database pool, the bus
    (a tap), a publisher and the source's context."""
    async with (
        session(unique_name("mq")) as name,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
        publisher() as pub,
    ):
        yield name, pool, tap, pub, context(pool, name, tap, type="mqtt")


def ce(i: int | str) -> bytes:
    return orjson.dumps({"specversion": "1.0", "id": f"q{i}", "source": "/s", "type": "t"})


def mqtt(name: str, topic: str, **settings: Any) -> MqttSource:
    source = build_source({"name": name, "type": "mqtt", "topics": [topic], **settings})
    assert isinstance(source, MqttSource)
    return source


async def _state_is(ctx: SourceContext, state: str) -> bool:
    return ctx.status.state == state


async def test_messages_arrive_and_malformed_ones_are_kept(
    database_dsn: str, nats_url: str
) -> None:
    prefix = unique_name("dev")
    async with _rig(database_dsn, nats_url) as (name, pool, tap, pub, ctx):
        async with running(mqtt(name, f"{prefix}/#"), ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            await pub.publish(f"{prefix}/a", ce(1), qos=1)
            await pub.publish(f"{prefix}/b", b"\xffnot json", qos=1)
            await pub.publish(f"{prefix}/c", ce(2), qos=1)
            events = await tap.take(2)
        assert [e["id"] for e in events] == ["q1", "q2"]
        rows = await dead_letters(pool, name)
        assert [r["payload"] for r in rows] == [b"\xffnot json"]
        assert orjson.loads(rows[0]["meta"]) == {"topic": f"{prefix}/b"}


def _properties(content_type: str | None, *user: tuple[str, str]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        props.ContentType = content_type
    if user:
        props.UserProperty = list(user)
    return props


async def test_mqtt_5_binary_mode_events_are_read_from_user_properties(
    database_dsn: str, nats_url: str
) -> None:
    # MQTT 5's binding: attributes as user properties, the Content Type property typing the
    # payload. Read as structured JSON, such an event was dead-lettered "missing required
    # attribute 'id'", its properties not kept.
    prefix = unique_name("v5")
    attributes = (("specversion", "1.0"), ("id", "b1"), ("source", "/v5"), ("type", "t.v5"))
    async with (
        session(unique_name("mq")) as name,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
        aiomqtt.Client(
            "127.0.0.1",
            1883,
            identifier=unique_name("pub"),
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as pub,
    ):
        ctx = context(pool, name, tap, type="mqtt")
        async with running(mqtt(name, f"{prefix}/#", protocol="5"), ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            binary = _properties("application/json", *attributes, ("region", "eu"))
            await pub.publish(f"{prefix}/a", b'{"n": 1}', qos=1, properties=binary)
            # an application's own property (not an attribute name) is left out
            text = _properties("text/plain", *attributes[:1], ("id", "b2"), *attributes[2:])
            text.UserProperty.append(("X-Trace", "abc"))
            await pub.publish(f"{prefix}/b", b"hello", qos=1, properties=text)
            # structured mode: the Content Type says so, the properties are not read
            structured = _properties("application/cloudevents+json", ("id", "ignored"))
            await pub.publish(f"{prefix}/c", ce(3), qos=1, properties=structured)
            twice = _properties(None, *attributes, ("id", "b4"))
            await pub.publish(f"{prefix}/d", b"{}", qos=1, properties=twice)
            nameless = _properties("application/json", *attributes[:1], *attributes[2:])
            await pub.publish(f"{prefix}/e", b"{}", qos=1, properties=nameless)
            await pub.publish(f"{prefix}/f", ce(6), qos=1)  # no properties: structured
            events = await tap.take(4)
        assert [e["id"] for e in events] == ["b1", "b2", "q3", "q6"]
        first, second = events[0], events[1]
        assert (first["type"], first["source"], first["region"]) == ("t.v5", "/v5", "eu")
        assert (first["datacontenttype"], first["data"]) == ("application/json", {"n": 1})
        assert (second["data"], "x-trace" in second) == ("hello", False)
        rows = await dead_letters(pool, name)
        assert len(rows) == 2, rows
        assert "more than one 'id' user property" in rows[0]["error"], rows[0]
        assert "missing required attribute 'id'" in rows[1]["error"], rows[1]
        meta = orjson.loads(rows[1]["meta"])
        assert meta["topic"] == f"{prefix}/e" and meta["content_type"] == "application/json"
        kept = {h["name"]: h["value"] for h in meta["headers"]}
        assert kept == {"specversion": "1.0", "source": "/v5", "type": "t.v5"}, meta


async def test_raw_format_subject_is_the_topic(database_dsn: str, nats_url: str) -> None:
    prefix = unique_name("sensor")
    async with _rig(database_dsn, nats_url) as (name, _pool, tap, pub, ctx):
        source = mqtt(name, f"{prefix}/+", format="raw", event_type="temp", event_source="/mqtt")
        async with running(source, ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            await pub.publish(f"{prefix}/kitchen", b"21.5", qos=1)
            (event,) = await tap.take(1)
    assert (event["subject"], event["data"], event["type"]) == (f"{prefix}/kitchen", 21.5, "temp")


async def test_unacked_messages_come_back_after_bus_outage_and_restart(
    database_dsn: str, nats_url: str
) -> None:
    prefix = unique_name("q")
    async with _rig(database_dsn, nats_url) as (name, _pool, tap, pub, ctx):
        async with running(mqtt(name, f"{prefix}/#"), ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            await pub.publish(f"{prefix}/x", ce(0), qos=1)
            await tap.wait_published(1)
            tap.down = True
            await pub.publish(f"{prefix}/x", ce(1), qos=1)
            await tap.wait_refused(1)
            await eventually(lambda: _state_is(ctx, "backoff"))
        # Stopped (a crash) with q1 never acked; q2 arrives while the source is away and is
        # kept by the broker in the persistent session.
        await pub.publish(f"{prefix}/x", ce(2), qos=1)
        tap.down = False
        async with running(mqtt(name, f"{prefix}/#"), ctx):
            await tap.wait_published(3)
        ids = [e["id"] for e in await tap.take(3)]
    assert sorted(ids) == ["q0", "q1", "q2"]


async def test_a_retained_message_is_published_once_until_it_changes(
    database_dsn: str, nats_url: str
) -> None:
    # Each (re)connect subscribes again, and the broker sends the topic's retained message
    # with it: it reached the targets again at every reconnect and restart (raw: under a new
    # id each time).
    topic = unique_name("state") + "/lamp"
    raw = {"format": "raw", "event_type": "t", "event_source": "/mq"}
    async with _rig(database_dsn, nats_url) as (name, _pool, tap, pub, ctx):
        await pub.publish(topic, b"on", qos=1, retain=True)
        try:
            for expected in (2, 3, 4):  # the first start ("on", "live"), then two restarts
                async with running(mqtt(name, topic, **raw), ctx):
                    await eventually(lambda: _state_is(ctx, "running"))
                    await pub.publish(topic, b"live", qos=1)  # not retained: every one counts
                    await tap.wait_published(expected)
            await pub.publish(topic, b"off", qos=1, retain=True)  # while the source is away
            async with running(mqtt(name, topic, **raw), ctx):
                await eventually(lambda: _state_is(ctx, "running"))
                await pub.publish(topic, b"end", qos=1)
                events = await tap.take(7)
        finally:
            await pub.publish(topic, b"", qos=1, retain=True)  # the broker forgets it
    data = [e["data"] for e in events]
    assert sorted(data) == ["end", "live", "live", "live", "off", "off", "on"], data
    # "off" twice: published live to the session while away (not retained on that path),
    # then the retained copy sent at the subscribe, which differs from the last one published


async def test_a_retained_message_is_published_while_its_digest_cannot_be_read(
    database_dsn: str, nats_url: str
) -> None:
    # The digest's read or write failing (the database away) dropped the connection: the
    # QoS 0 messages queued behind were lost and the broker sent everything again.
    topic = unique_name("state") + "/door"
    raw = {"format": "raw", "event_type": "t", "event_source": "/mq"}
    async with _rig(database_dsn, nats_url) as (name, pool, tap, pub, ctx):
        await pool.execute("ALTER TABLE source_checkpoints RENAME TO checkpoints_away")
        try:
            await pub.publish(topic, b"open", qos=1, retain=True)
            async with running(mqtt(name, topic, **raw), ctx):
                await tap.wait_published(1)
                await pub.publish(topic, b"live", qos=1)
                await tap.wait_published(2)
                assert ctx.status.errors == 0 and ctx.status.state == "running"
        finally:
            await pub.publish(topic, b"", qos=1, retain=True)
            await pool.execute("ALTER TABLE checkpoints_away RENAME TO source_checkpoints")
        assert [e["data"] for e in await tap.take(2)] == ["open", "live"]


async def test_a_message_the_bus_refuses_is_held_qos_0_too(
    database_dsn: str, nats_url: str
) -> None:
    # QoS 0 is never sent again: the source dropped it with the connection it gave up to have
    # the broker redeliver, and reconnected every 0.5 s while the bus was down.
    prefix = unique_name("q0")
    async with _rig(database_dsn, nats_url) as (name, _pool, tap, pub, ctx):
        source = mqtt(name, f"{prefix}/#")
        async with running(source, ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            tap.down = True
            await pub.publish(f"{prefix}/x", ce("held"), qos=0)
            await tap.wait_refused(2)  # tried again, on the same connection
            assert ctx.status.state == "backoff"
            tap.down = False
            (event,) = await tap.take(1)
            assert event["id"] == "qheld"


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"topics": []}, "field 'topics'"),
        ({"port": 0}, "field 'port'"),
        ({"qos": 2}, "field 'qos'"),
        ({"format": "raw", "event_type": "t"}, "needs both"),
        ({"protocol": 4}, "field 'protocol'"),
        ({"protocol": True}, "field 'protocol'"),
        # every bad filter at once: one fixed, the next came only at the next start
        ({"topics": ["a/#/b", "ok/+", "x+/y"]}, "topic filter 'a/#/b': .*; topic filter 'x\\+/y'"),
    ],
)
def test_bad_mqtt_config_names_the_source(settings: dict[str, Any], fragment: str) -> None:
    spec = {"name": "m", "type": "mqtt", "topics": ["a/#"], **settings}
    with pytest.raises(ConfigError, match=f"source 'm' \\(mqtt\\): .*{fragment}"):
        build_source(spec)


def test_protocol_5_may_be_written_as_a_number() -> None:
    # YAML reads `protocol: 5` as a number: refused with "Input should be '3.1.1' or '5'"
    source = mqtt("m", "a/#", protocol=5)
    assert source.config.protocol == "5"


class _Relay:
    """A TCP relay to the broker that can stop passing bytes (``flowing.clear()``), as a
    frozen broker (or a path cut without a reset) does: the connection stays open, nothing
    comes back."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._clients: list[asyncio.StreamWriter] = []
        self._held: list[bytes] | None = None  # what the broker sent, while holding it

    async def __aenter__(self) -> _Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    def cut(self) -> None:
        """Close every connection it relays (both ends), as a broker restart does."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    @property
    def held(self) -> int:
        """Bytes held so far."""
        return sum(map(len, self._held or ()))

    def hold(self) -> None:
        """Keep what the broker sends from the client from now on (see :meth:`reset`)."""
        self._held = []

    def reset(self) -> int:
        """Hand the client what was held, with a reset (TCP RST) right behind it: its socket
        then holds unread packets and an error at once. Returns the bytes handed over."""
        held, self._held = b"".join(self._held or ()), None
        for client in self._clients:
            client.write(held)  # on loopback, in the client's receive buffer at once
            sock = client.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abort()
        self._clients.clear()
        self.cut()
        return len(held)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 1883)
        self._writers += [writer, up_writer]
        self._clients.append(writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    if dst is writer and self._held is not None:
                        self._held.append(data)
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_broker_that_stops_answering_is_found_by_the_keepalive(
    database_dsn: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiomqtt's default keepalive (60 s): a source whose broker froze showed running for a
    # minute and a half.
    monkeypatch.setattr(mqtt_module, "KEEPALIVE", 1)
    async with _rig(database_dsn, nats_url) as (name, _pool, _tap, _pub, ctx), _Relay() as relay:
        source = mqtt(name, unique_name("k") + "/#", port=relay.port)
        async with running(source, ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            relay.flowing.clear()
            await eventually(lambda: _state_is(ctx, "backoff"), within=10, what="backoff")
            relay.flowing.set()
            await eventually(lambda: _state_is(ctx, "running"), within=30, what="running")


async def test_messages_queued_when_the_connection_broke_are_left_to_the_brokers_resend(
    database_dsn: str, nats_url: str
) -> None:
    # The client still held messages of a connection that broke: published from its queue,
    # then sent again by the broker on the next session, each reached the targets twice (a
    # raw one under two ids: 20 in a review's broker restart).
    prefix = unique_name("qc")
    raw = {"format": "raw", "event_type": "t.raw", "event_source": "/mqtt"}
    async with _rig(database_dsn, nats_url) as (name, _pool, tap, pub, ctx), _Relay() as relay:
        async with running(mqtt(name, f"{prefix}/#", port=relay.port, **raw), ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            tap.down = True
            for i in range(5):
                await pub.publish(f"{prefix}/x", f"m{i}".encode(), qos=1)
            await tap.wait_refused(1)  # m0 held; m1 to m4 wait in the client's queue
            relay.cut()
            await asyncio.sleep(0.5)  # the client sees its connection closed
            tap.down = False
            # m0, in hand when the connection broke, goes twice (its acknowledgement was lost
            # with the connection; let go, it was lost where the broker kept no session); the
            # others once, from the broker's resend
            await tap.wait_published(6)
            # A short settle, kept on purpose: what is measured is that no more copies come.
            await asyncio.sleep(1.0)
        payloads = sorted(event["data"] for event in await tap.take(tap.published))
    assert payloads == ["m0", "m0", "m1", "m2", "m3", "m4"]


async def test_a_reset_behind_unread_messages_is_seen_at_once_on_uvloop(
    serve_process: Callable[..., ServeProcess], receiver: Receiver
) -> None:
    # On uvloop (as eventbus serve runs), a connection reset while packets were still unread
    # stopped the source for its keepalive (20 to 40 s): uvloop gave the reader one last call,
    # paho read one packet of it, never saw the reset, and nothing was read or written until
    # the keepalive gave up; the broker dropped what it queued meanwhile (1,581 messages in a
    # review's run). A process of its own: the tests' own loop is asyncio's.
    receiver.respond(Response(204))
    prefix = unique_name("rst")
    async with session(unique_name("mq")) as name, _Relay() as relay, publisher() as pub:
        source = {
            "name": name,
            "type": "mqtt",
            "port": relay.port,
            "topics": [f"{prefix}/#"],
            "format": "raw",
            "event_type": "t.raw",
            "event_source": "/mqtt",
        }
        service = serve_process(
            rules="- name: all\n  targets: [fn]\n",
            targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
            sources=[source],
        )
        await service.start()

        async def subscribed() -> bool:  # a message before the first subscribe is not kept
            async with (
                aiohttp.ClientSession() as http,
                http.get(service.url + "/sources") as resp,
            ):
                listed = await resp.json()
            return any(s["name"] == name and s["state"] == "running" for s in listed["sources"])

        await eventually(subscribed, what="the source subscribed")
        await pub.publish(f"{prefix}/x", b"first", qos=1)
        await receiver.wait_for(1, timeout=10)
        held = 10 * len(f"{prefix}/x")  # ten PUBLISH packets, each with its topic
        for round_ in range(2):
            relay.hold()
            for i in range(10):
                await pub.publish(f"{prefix}/x", f"r{round_}-{i}".encode(), qos=1)
            await eventually(lambda: relay.held >= held, what="messages held unread")
            relay.reset()
            # all of them, resent by the broker on the next connection, long before the
            # keepalive (and the next round on a connection made again)
            await receiver.wait_for(1 + 10 * (round_ + 1), timeout=10)
        await service.terminate()
    payloads = {r.body for r in receiver.requests}
    assert payloads >= {b"first", *(f"r{n}-{i}".encode() for n in range(2) for i in range(10))}


async def test_a_topic_dropped_from_the_settings_no_longer_arrives(
    database_dsn: str, nats_url: str
) -> None:
    # The persistent session kept its subscriptions: a topic removed from `topics` (and the
    # service restarted) kept arriving for ever.
    prefix = unique_name("drop")
    async with _rig(database_dsn, nats_url) as (name, _pool, tap, pub, ctx):

        def source(*topics: str) -> MqttSource:
            built = build_source({"name": name, "type": "mqtt", "topics": list(topics)})
            assert isinstance(built, MqttSource)
            return built

        async with running(source(f"{prefix}/a", f"{prefix}/b"), ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            await pub.publish(f"{prefix}/b", ce("b1"), qos=1)
            (first,) = await tap.take(1)
        assert first["id"] == "qb1"
        ctx.status.state = "starting"
        async with running(source(f"{prefix}/a"), ctx):
            await eventually(lambda: _state_is(ctx, "running"))
            # in order on one session: b2 would come first were it still subscribed
            await pub.publish(f"{prefix}/b", ce("b2"), qos=1)
            await pub.publish(f"{prefix}/a", ce("a1"), qos=1)
            (second,) = await tap.take(1)
        assert second["id"] == "qa1"


def test_two_sources_of_one_broker_session_are_refused() -> None:
    # They shared the broker's session: each closed the other's connection every few
    # seconds, and got the other's messages under its own name.
    from eventbus.app import build_adapters
    from eventbus.config import ConnectorSet, connector_spec

    spec = connector_spec("source", "mqtt")
    found = ConnectorSet(
        sources={
            "a": spec.model_validate({"name": "a", "topics": ["x"], "client_id": "same"}),
            "b": spec.model_validate({"name": "b", "topics": ["y"], "client_id": "same"}),
            "c": spec.model_validate(
                {"name": "c", "topics": ["y"], "client_id": "same", "port": 1884}
            ),
            "e": spec.model_validate({"name": "e", "topics": ["z"]}),  # its default id
            "f": spec.model_validate(
                {"name": "f", "topics": ["z"], "client_id": "eventbus-source-e"}
            ),
        }
    )
    with pytest.raises(ConfigError) as info:
        build_adapters(found)
    assert str(info.value).splitlines() == [
        "mqtt source 'b': client id 'same' on 127.0.0.1:1883 is also source 'a''s: each "
        "source needs its own (client_id)",
        "mqtt source 'f': client id 'eventbus-source-e' on 127.0.0.1:1883 is also source "
        "'e''s: each source needs its own (client_id)",
    ]
