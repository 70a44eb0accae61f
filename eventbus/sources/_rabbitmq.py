"""The ``rabbitmq`` source: messages of an AMQP 0-9-1 queue become events on the bus.

Place in the pipeline: RabbitMQ queue → this consumer (manual acks, ``prefetch`` unacked at
most) → :func:`_queues.publish_held` → bus → ack. A message whose events the bus does not take
is held, unacked, and published again with backoff (the same events, ids included) until the
bus takes them: it was rejected with requeue, and each rejection counted toward a quorum
queue's delivery limit (a bus outage of seconds dead-lettered or dropped good messages), and a
raw message without a ``message_id`` came back under a new random id (delivered twice when the
first publish was stored late). A crash leaves it unacked and RabbitMQ redelivers it:
at-least-once. The queue must exist (it is not declared here, so
its durability and arguments stay the operator's). Several instances on one queue share it.

``format: cloudevents`` reads the AMQP binding: binary mode when the message has
``cloudEvents:`` (or ``cloudEvents_``) application properties, structured JSON otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import pydantic
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError
from yarl import URL

from eventbus._errors import CloudEventError, error_text
from eventbus._tasks import cancel_and_wait
from eventbus.cloudevents import format_time, from_kafka
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

__all__ = ["RabbitMQSource", "RabbitMQSourceSpec"]

_PREFIXES = ("cloudEvents:", "cloudEvents_")
HEARTBEAT = 20
"""Seconds between AMQP heartbeats unless the URL's ``heartbeat`` says otherwise."""


class RabbitMQSourceSpec(QueueSourceSpec):
    """YAML settings of a ``type: rabbitmq`` source.

    ``username`` and ``password`` (a secret) replace those of the URL; ``tls`` (with an
    ``amqps://`` URL) verifies the broker with its own CA, name or client certificate.
    """

    url: str = pydantic.Field(pattern=r"^amqps?://")
    queue: str = pydantic.Field(min_length=1)
    prefetch: int = pydantic.Field(100, ge=1, le=65_535)
    username: str | None = None
    password: Secret | None = None
    tls: TlsSpec | None = None

    @pydantic.model_validator(mode="after")
    def _tls_needs_amqps(self) -> RabbitMQSourceSpec:
        if self.tls is not None and not self.url.startswith("amqps://"):
            raise ValueError("tls needs an amqps:// url")
        if self.password is not None and self.username is None:
            raise ValueError("password needs a username")
        return self


def _cloudevent(message: AbstractIncomingMessage, max_size: int) -> dict[str, Any]:
    """The event of an AMQP message (binary or structured mode) of at most ``max_size``
    bytes; raises CloudEventError."""
    # The AMQP binary mode is the Kafka one with another header prefix: translate the names
    # and let the Kafka binding do the reading.
    headers: list[tuple[str, bytes]] = []
    if message.content_type:
        headers.append(("content-type", message.content_type.encode()))
        if message.content_type.lower().startswith("application/cloudevents"):
            # structured mode: the properties are not read (one of them unreadable refused
            # the event they do not belong to)
            return from_kafka(headers, None, message.body, max_size=max_size)
    named: dict[str, str] = {}
    for name, value in (message.headers or {}).items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                attribute = name.removeprefix(prefix)
                if attribute.lower() in named:
                    raise CloudEventError(
                        f"the AMQP message has both {named[attribute.lower()]!r} and {name!r}"
                    )
                named[attribute.lower()] = name
                headers.append(("ce_" + attribute, _property_bytes(name, value)))
    return from_kafka(headers, None, message.body, max_size=max_size)


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    """Whether the channel ``message`` came on closed (its broker sends it again)."""
    try:
        return bool(message.channel.is_closed)
    except aiormq.exceptions.ChannelInvalidStateError:  # aio_pika's answer for a closed one
        return True


def _property_bytes(name: str, value: object) -> bytes:
    """An application property as the attribute's text: the AMQP binding maps a timestamp to
    ``time`` and a boolean to ``true``/``false`` (``str()`` gave "2026-01-02 03:04:05+00:00",
    refused as no RFC 3339 time, and "True"). A value of no CloudEvents type (null, a table,
    an array, a float) is refused: ``str()`` made ``type`` "None" and ``source`` a Python
    repr, and the event was delivered."""
    if isinstance(value, bytes | bytearray):  # a byte array (Java's byte[], Go's []byte)
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            # read by the Kafka binding, it was said to be the "Kafka header 'ce_...'"
            raise CloudEventError(f"the AMQP property {name!r} is not UTF-8: {exc}") from None
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return format_time(moment).encode()
    kind = "null" if value is None else type(value).__name__
    raise CloudEventError(
        f"AMQP application property {name!r} is {kind}, not a CloudEvents attribute value "
        "(a string, boolean, integer or timestamp)"
    )


class RabbitMQSource:
    """Consumes one queue; acks after publishing, holding a message until the bus takes it."""

    reports_running = True  # once connected and subscribed (see SourceRunner)

    def __init__(self, config: RabbitMQSourceSpec) -> None:
        """Raises ConfigError when a file of the TLS block cannot be read."""
        self.name = config.name
        self.type = config.type
        self.config = config
        url = URL(config.url)
        if config.username is not None:
            url = url.with_user(config.username)
        if config.password is not None:
            url = url.with_password(config.password.reveal())
        if "heartbeat" not in url.query:
            # aiormq gives a broker that stopped answering three heartbeats: at the broker's
            # 60 s, a frozen broker showed running for three minutes
            url = url.update_query(heartbeat=HEARTBEAT)
        self._url = url
        where = f"rabbitmq source {config.name!r}"
        if config.tls is None and url.query.get("no_verify_ssl", "0") != "0":
            # aiormq's own switch (anything but "0" turns verification off; a tls block's
            # context overrides it), which insecure_skip_verify spells out
            logging.getLogger("eventbus.sources").warning(
                "%s: TLS CERTIFICATE VERIFICATION IS OFF (no_verify_ssl in the URL): anyone "
                "between eventbus and the broker can read and change the traffic",
                where,
            )
        self._ssl: ssl.SSLContext | None = None if config.tls is None else config.tls.context(where)

    async def run(self, ctx: SourceContext) -> None:
        """Consume until cancelled; reconnects with backoff when the broker goes away."""
        transient = (AMQPError, aiormq.exceptions.AMQPError, OSError)
        await consume_forever(ctx, lambda backoff: self._consume(ctx, backoff), transient)

    async def _consume(self, ctx: SourceContext, backoff: Backoff) -> None:
        try:
            connection = await aio_pika.connect(
                self._url,
                timeout=10,
                ssl_context=self._ssl,
                # named in the broker's connection list (rabbitmqctl, the management UI)
                client_properties={"connection_name": f"eventbus source {self.name}"},
            )
        except aiormq.exceptions.InvalidFrameError as exc:
            if "Connection.OpenOk" not in str(exc):
                raise
            # The broker closed the connection at its Connection.Open (aiormq keeps only the
            # frame's repr: "Expected one of ['Connection.OpenOk'], got <Connection.Close
            # object at 0x...>")
            raise ConnectionError(
                f"the broker refused virtual host {self._url.path[1:] or '/'!r}: it does not "
                "exist, the user may not use it, or it takes no more connections"
            ) from exc
        # Why the broker closed the connection (CONNECTION_FORCED by an operator, a node going
        # down): the reading just ends, and the status said only that the subscription ended.
        closed: list[BaseException | None] = []
        connection.close_callbacks.add(lambda _sender, exc: closed.append(exc))
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.config.prefetch)
            queue = await channel.get_queue(self.config.queue, ensure=True)
            # The broker cancels the consumer when the queue is deleted (or fails over): the
            # iterator then waits for ever, and the source showed running, reading nothing.
            cancelled = asyncio.Event()
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda _frame: cancelled.set())
            async with queue.iterator() as messages:  # consuming once entered
                ctx.connected()
                reading = asyncio.ensure_future(self._read(ctx, messages, backoff))
                gone = asyncio.ensure_future(cancelled.wait())
                try:
                    await asyncio.wait({reading, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (reading, gone):
                        await cancel_and_wait(task)
                if reading.done() and not reading.cancelled():
                    reading.result()  # what ended the reading, if it raised
                if cancelled.is_set():
                    raise ConnectionError(
                        f"the broker cancelled the consumer of {self.config.queue!r} (the "
                        "queue deleted, or moved to another node)"
                    )
                if closed and closed[0] is not None:
                    # not always the broker: aiormq ends a connection whose broker stopped
                    # answering (its heartbeats missed), with an exception of no text
                    raise ConnectionError(f"the connection closed: {error_text(closed[0])}")
        finally:
            await connection.close()

    async def _read(
        self, ctx: SourceContext, messages: AsyncIterator[AbstractIncomingMessage], backoff: Backoff
    ) -> None:
        async for message in messages:
            await self._publish(ctx, message)
            try:
                await message.ack()
            except aiormq.exceptions.ChannelInvalidStateError as exc:
                # its channel closed after the bus took it (the connection lost while it was
                # held): the broker sends it again; this was a crash, with a traceback
                raise ConnectionError(f"the channel closed before the ack: {exc!r}") from exc
            # after an ack, not at the connect: a message that breaks the connection as it
            # arrives (one the client cannot decode) makes it back off, not retry every 0.5 s
            backoff.reset()

    async def _publish(self, ctx: SourceContext, message: AbstractIncomingMessage) -> None:
        def convert() -> list[dict[str, Any]]:
            return events_of(
                self.config,
                message.body,
                lambda size: _cloudevent(message, size),
                max_size=ctx.max_event_size,
                id=message.message_id,
                subject=message.routing_key,
                time=message.timestamp,
            )

        where = {
            "queue": self.config.queue,
            "routing_key": message.routing_key,
            "message_id": message.message_id,
            "content_type": message.content_type,
        }
        meta = Whence(where, message.headers)
        await publish_held(ctx, message.body, convert, meta, lambda: _channel_closed(message))
