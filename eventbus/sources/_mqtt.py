"""The ``mqtt`` source: MQTT messages (QoS 1) become events on the bus.

Place in the pipeline: MQTT broker → this client (persistent session) →
:func:`_queues.publish_message` → bus → PUBACK. The client connects with a stable client id and
``clean_session = false`` and subscribes with QoS 1, so the broker keeps messages for it while
it is away and resends every message it has not acknowledged when it reconnects.

Acknowledgement after publish: aiomqtt 2.x has no manual-ack API, and its paho-mqtt client
would otherwise PUBACK a message on receipt, before it is on the bus. The source switches the
underlying paho client to manual acks (``manual_ack_set``, paho-mqtt 2.x) and acks each
message only after its events are on the bus; when publishing fails it holds the message and
tries again with backoff, on the same connection (a QoS 0 message is never sent again; dropped
with the connection, it was lost). A broken connection is made again with backoff, and the
broker redelivers what was not acked: at-least-once. The broker's in-flight limit (Mosquitto:
``max_inflight_messages``, 20) bounds how many unacked messages the client holds, and
``MAX_QUEUED`` how many it keeps waiting. MQTT 3.1.1 carries no headers, so
``format: cloudevents`` means structured mode; with MQTT 5 a message whose user properties
name a ``specversion`` is a binary-mode event (``from_mqtt``).
"""

from __future__ import annotations

import hashlib
import logging
import select
from typing import Any, Literal

import aiomqtt
import orjson
import paho.mqtt.client as paho_mqtt
import pydantic
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from eventbus._errors import StoreError
from eventbus.cloudevents import from_mqtt
from eventbus.config import Secret, TlsSpec
from eventbus.sources._base import SourceContext
from eventbus.sources._clock import Backoff
from eventbus.sources._queues import (
    QueueSourceSpec,
    Whence,
    consume_forever,
    events_of,
    publish_held,
)

__all__ = ["MqttSource", "MqttSourceSpec", "duplicate_sessions", "topic_filter_problem"]

log = logging.getLogger(__name__)


class MqttSourceSpec(QueueSourceSpec):
    """YAML settings of a ``type: mqtt`` source.

    ``client_id`` defaults to ``eventbus-source-<name>``; it names the broker-side session, so
    it must be stable across restarts and unique per source (instances of one source cannot
    share it: MQTT 3.1.1 has no shared subscriptions). ``protocol`` is the MQTT version,
    chosen explicitly (``"3.1.1"`` or ``"5"``); ``password`` is a secret; ``tls`` turns on TLS
    (``port`` then defaults to 8883).
    """

    host: str = "127.0.0.1"
    port: int | None = pydantic.Field(None, ge=1, le=65_535)
    username: str | None = None
    password: Secret | None = None
    topics: list[str] = pydantic.Field(min_length=1)
    client_id: str | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    tls: TlsSpec | None = None

    @pydantic.field_validator("topics")
    @classmethod
    def _valid_filters(cls, topics: list[str]) -> list[str]:
        # refused by the client at subscribe only: the source retried for ever, in backoff
        problems = [
            f"topic filter {topic!r}: {problem}"
            for topic in topics
            if (problem := topic_filter_problem(topic)) is not None
        ]
        if problems:  # all of them: one fixed, the next one came only at the next start
            raise ValueError("; ".join(problems))
        return topics

    def client_identifier(self) -> str:
        """The client id the broker knows this source's session by."""
        return self.client_id or f"eventbus-source-{self.name}"

    def broker(self) -> tuple[str, int]:
        return self.host, self.port or (1883 if self.tls is None else 8883)

    @pydantic.field_validator("protocol", mode="before")
    @classmethod
    def _version_as_written(cls, value: object) -> object:
        # YAML reads ``protocol: 5`` as a number, refused as "Input should be '3.1.1' or '5'"
        return "5" if value == 5 and not isinstance(value, bool) else value

    @pydantic.model_validator(mode="after")
    def _password_needs_username(self) -> MqttSourceSpec:
        if self.password is not None and self.username is None:
            raise ValueError("password needs a username")
        return self


def topic_filter_problem(topic: str) -> str | None:
    """What makes ``topic`` no MQTT topic filter (MQTT 3.1.1 section 4.7), or None: empty,
    longer than 65,535 bytes of UTF-8, a NUL, ``#`` other than a whole last level, ``+`` other
    than a whole level."""
    if not topic:
        return "empty"
    if len(topic.encode("utf-8", "surrogatepass")) > 65_535:
        return "longer than 65,535 bytes"
    if "\x00" in topic:
        return "holds a NUL character"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level, the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def duplicate_sessions(specs: list[MqttSourceSpec]) -> list[tuple[str, str]]:
    """(source name, problem) for each source sharing its broker and client id with an
    earlier one: the broker keeps one session per client id, closes one connection for the
    other every few seconds, and each source got the other's messages under its own name."""
    problems = []
    first: dict[tuple[str, int, str], str] = {}
    for spec in specs:
        host, port = spec.broker()
        key = (host, port, spec.client_identifier())
        other = first.setdefault(key, spec.name)
        if other != spec.name:
            problems.append(
                (
                    spec.name,
                    f"mqtt source {spec.name!r}: client id {key[2]!r} on {host}:{port} is "
                    f"also source {other!r}'s: each source needs its own (client_id)",
                )
            )
    return problems


MAX_QUEUED = 10_000
"""Messages the client keeps waiting while one is held (the bus down): beyond, aiomqtt drops
new ones with a warning (QoS 0 ones are lost; QoS 1 ones the broker sends again)."""

KEEPALIVE = 20
"""Seconds between the client's pings: a broker that stops answering (frozen, cut off without
a reset) is found in about 1.5 times that (aiomqtt's default, 60 s, kept such a source
showing running for a minute and a half)."""

MAX_READS = 100
"""Packets a wake-up of the client's reader reads at most on a connection reset behind unread
ones (see :func:`_read_to_the_end`); the broker's in-flight window keeps fewer waiting."""

_TOPICS = "topics"
"""Checkpoint key: the topic filters subscribed (JSON), to unsubscribe those later dropped."""

SESSION_EXPIRY = 7 * 24 * 3600
"""MQTT 5: seconds the broker keeps the session (and messages for it) while the source is away."""


def _payload(message: aiomqtt.Message) -> bytes:
    raw = message.payload
    return raw if isinstance(raw, bytes) else str(raw).encode()


class MqttSource:
    """Subscribes to ``topics`` at QoS 1; acks after publishing (see the module docstring)."""

    # Under a lease (see SourceRunner): two instances of one source either share its client id,
    # and the broker closes one connection for the other every few seconds, or subscribe each
    # with its own and both get every message (MQTT 3.1.1 has no shared subscriptions).
    one_instance = True
    reports_running = True  # once subscribed (see SourceRunner)

    def __init__(self, config: MqttSourceSpec) -> None:
        """Raises ConfigError when a file of the TLS block cannot be read."""
        self.name = config.name
        self.type = config.type
        self.config = config
        where = f"mqtt source {config.name!r}"
        self._tls = None if config.tls is None else config.tls.context(where)

    async def run(self, ctx: SourceContext) -> None:
        """Consume until cancelled; reconnects with backoff when the broker goes away."""
        await consume_forever(
            ctx, lambda backoff: self._consume(ctx, backoff), (aiomqtt.MqttError, OSError)
        )

    async def _consume(self, ctx: SourceContext, backoff: Backoff) -> None:
        cfg = self.config
        session: dict[str, Any]
        if cfg.protocol == "5":
            # MQTT 5 keeps a session by its expiry interval instead of clean_session.
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY
            session = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": False,
                "properties": properties,
            }
        else:
            session = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}
        client = aiomqtt.Client(
            *cfg.broker(),
            username=cfg.username,
            password=None if cfg.password is None else cfg.password.reveal(),
            identifier=cfg.client_identifier(),
            timeout=10,
            keepalive=KEEPALIVE,
            tls_context=self._tls,
            max_queued_incoming_messages=MAX_QUEUED,
            **session,
        )
        # aiomqtt exposes no manual ack; its paho client does (see the module docstring).
        paho = client._client
        paho.manual_ack_set(True)
        _read_to_the_end(paho)
        async with client:
            for topic in self.config.topics:
                granted = await client.subscribe(topic, qos=1)
                _check_granted(topic, granted)
            await self._unsubscribe_dropped(ctx, client)
            ctx.connected()
            async for message in client.messages:
                if message.qos > 0 and not paho.is_connected():
                    # Queued before the connection broke: it cannot be acknowledged now, and
                    # the broker sends it again on the next session (published from the queue
                    # as well, each reached the targets twice, a raw one under two ids).
                    continue
                if message.retain:
                    await self._publish_retained(ctx, message)
                else:
                    await self._publish(ctx, message)
                if message.qos > 0:
                    paho.ack(message.mid, message.qos)
                # after a message, not at the connect: a connection that breaks at once
                # again and again backs off as it should (it reconnected every 0.5 s)
                backoff.reset()

    async def _unsubscribe_dropped(self, ctx: SourceContext, client: aiomqtt.Client) -> None:
        """Unsubscribe the topics subscribed at an earlier start and no longer configured: the
        persistent session keeps its subscriptions, and a topic removed from ``topics`` kept
        arriving for ever. The topics subscribed are kept as a checkpoint; with the database
        unreachable, the ones dropped are unsubscribed at a later connect."""
        topics = self.config.topics
        try:
            before = await ctx.checkpoints.get(_TOPICS)
        except StoreError as exc:
            log.warning("mqtt source %s: the topics subscribed before: %s", self.name, exc)
            return
        held: list[str] | None = orjson.loads(before) if before else None
        for topic in held or ():
            if topic not in topics:
                await client.unsubscribe(topic)
                log.info("mqtt source %s: unsubscribed %r (no longer in topics)", self.name, topic)
        if held is None or sorted(held) != sorted(topics):
            try:
                await ctx.checkpoints.put(_TOPICS, orjson.dumps(topics).decode())
            except StoreError as exc:
                log.warning("mqtt source %s: the topics subscribed: %s", self.name, exc)

    async def _publish_retained(self, ctx: SourceContext, message: aiomqtt.Message) -> None:
        """A retained message (the broker's last word on its topic, sent at each subscribe):
        published only when it differs from the one last published for the topic. Each
        reconnect and restart re-subscribes, and every retained message reached the targets
        again (a ``raw`` one under a new id each time)."""
        topic = message.topic.value
        key = f"retained:{topic}"
        digest = hashlib.sha256(_payload(message)).hexdigest()
        # The digest is a saving, not a guarantee: with the database unreachable the message
        # is published (once more, perhaps) rather than the connection dropped for it, which
        # lost the QoS 0 messages queued behind it and had the broker resend everything.
        try:
            if await ctx.checkpoints.get(key) == digest:
                return
        except StoreError as exc:
            log.warning("mqtt source %s: retained message of %s: %s", self.name, topic, exc)
        await self._publish(ctx, message)
        try:
            await ctx.checkpoints.put(key, digest)
        except StoreError as exc:
            log.warning("mqtt source %s: retained message of %s: %s", self.name, topic, exc)

    async def _publish(self, ctx: SourceContext, message: aiomqtt.Message) -> None:
        payload = _payload(message)
        topic = message.topic.value
        # MQTT 5's properties: a binary-mode CloudEvent's attributes are its user properties
        # (read as structured JSON, it was dead-lettered "missing required attribute 'id'")
        properties = message.properties
        content_type: str | None = getattr(properties, "ContentType", None)
        user: list[tuple[str, str]] = list(getattr(properties, "UserProperty", None) or ())

        def convert() -> list[dict[str, Any]]:
            return events_of(
                self.config,
                payload,
                lambda size: from_mqtt(content_type, user, payload, max_size=size),
                max_size=ctx.max_event_size,
                subject=topic,
            )

        where: dict[str, Any] = {"topic": topic}
        if content_type is not None:
            where["content_type"] = content_type
        # A QoS 1 message held (the bus down) whose connection broke meanwhile is published
        # all the same: the broker sends it again only if it kept the session (a broker
        # restarted without persistence has none, and a message let go was lost), so it
        # may arrive twice, a raw one under two ids.
        await publish_held(ctx, payload, convert, Whence(where, user))


def _read_to_the_end(paho: paho_mqtt.Client) -> None:
    """Have a wake-up of the client's reader that finds the connection reset read on to it.

    aiomqtt reads with paho's ``loop_read``, one packet a call, each time the loop says the
    socket is readable. A connection reset while packets were still unread (the socket
    reports an error beside them) makes uvloop call the reader once more, then close its watch
    of the socket for good, saying nothing: paho read one packet, never saw the reset, and the
    source neither read nor wrote (each ``add_writer`` raised "unable to perform operation on
    <UVPoll closed=True>") until the keepalive gave up, 20 to 40 s later, while the broker
    dropped what it queued meanwhile (1,581 QoS 1 messages in a review's run). When the socket
    reports an error or a hang-up, the call reads on (at most MAX_READS packets) so paho
    reaches the reset and closes the connection at once; otherwise it reads its one packet as
    before (reading on whenever bytes waited held the loop for seconds under a flood). Replaces
    ``loop_read`` on this one client: aiomqtt makes its reader inside its own socket callback,
    out of reach.
    """
    read_once = paho.loop_read
    broken = select.POLLERR | select.POLLHUP

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        rc = read_once(max_packets)
        for _ in range(MAX_READS):
            sock = paho.socket()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
                break
            try:
                poller = select.poll()
                poller.register(sock, select.POLLIN | broken)
                if not any(events & broken for _, events in poller.poll(0)):
                    break  # a healthy connection: one packet a call, as paho reads
            except (OSError, ValueError):  # closed meanwhile: the next read says so
                break
            rc = read_once(max_packets)
        return rc

    paho.loop_read = loop_read  # type: ignore[method-assign]


def _check_granted(topic: str, granted: Any) -> None:
    """Raise MqttError when the broker refused the subscription (a SUBACK reason code of 0x80
    or more: not authorized, say): the source showed running and received nothing."""
    codes = granted if isinstance(granted, list | tuple) else [granted]
    for code in codes:
        value = getattr(code, "value", code)
        if isinstance(value, int) and value >= 0x80:
            raise aiomqtt.MqttError(f"the broker refused the subscription to {topic!r}: {code}")
