"""The ``nats`` and ``jetstream`` sources: NATS messages become events on the bus.

Place in the pipeline: NATS subject or JetStream stream → this source →
:func:`_queues.publish_held` (``nats``) or :func:`_queues.publish_messages` (``jetstream``, a
fetched batch in one call) → bus → ack. The two differ in what they can promise:

* ``jetstream`` reads a durable pull consumer on an existing stream and acks a message only
  after its events are on the bus (nak when publishing fails, so it comes back): at-least-once.
  Instances with the same ``durable`` share the messages. ``status.lag`` is the consumer's
  pending count.
* ``nats`` subscribes to core NATS subjects. Core NATS has no acknowledgement: a message is
  delivered once, while the source is connected, and never again. The source holds a message
  and retries publishing it while the bus is down, but a message that arrives while the source
  is disconnected, or that a crash interrupts, is gone. Use JetStream for at-least-once.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import nats
import nats.errors
import pydantic
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from eventbus._errors import BusError, StoreError
from eventbus._tasks import stop_if_cancelled
from eventbus.cloudevents import from_nats
from eventbus.config import NatsAuth, redact_url, refuse_nats_plaintext
from eventbus.sources._base import SourceContext
from eventbus.sources._clock import Backoff
from eventbus.sources._queues import (
    Message,
    QueueSourceSpec,
    consume_forever,
    events_of,
    publish_held,
    publish_messages,
)

__all__ = ["JetStreamSource", "JetStreamSourceSpec", "NatsSource", "NatsSourceSpec"]

_TRANSIENT = (nats.errors.Error, OSError)
log = logging.getLogger("eventbus.sources")


class NatsSourceSpec(QueueSourceSpec, NatsAuth):
    """YAML settings of a ``type: nats`` source (core NATS subscription); credentials and
    ``tls`` as every NATS connection (:class:`eventbus.config.NatsAuth`)."""

    url: str = pydantic.Field(pattern=r"^(nats|tls)://")
    subjects: list[str] = pydantic.Field(min_length=1)
    queue_group: str | None = None


class JetStreamSourceSpec(QueueSourceSpec, NatsAuth):
    """YAML settings of a ``type: jetstream`` source.

    ``durable`` defaults to ``eventbus-source-<name>``; ``subject`` filters the stream (all of
    it when unset); ``batch`` is how many messages one pull asks for.
    """

    url: str = pydantic.Field(pattern=r"^(nats|tls)://")
    stream: str = pydantic.Field(min_length=1)
    durable: str | None = None
    subject: str | None = None
    batch: int = pydantic.Field(100, ge=1, le=10_000)


PING_INTERVAL = 10.0
MAX_OUTSTANDING_PINGS = 2


async def _connect(url: str, closed: asyncio.Event, auth: dict[str, Any]) -> Client:
    async def on_closed() -> None:
        closed.set()

    async def on_error(exc: Exception) -> None:
        # The consume loop reports the failure that matters; nats-py's default handler would
        # print a traceback for every attempt.
        log.debug("nats %s: %r", redact_url(url), exc)

    # No client-side reconnect, and one connect attempt: the consume loop reconnects with
    # backoff and reports it in the status.
    return await nats.connect(
        url,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0,
        connect_timeout=5,
        # a server that stops answering (frozen, or cut off without a reset) is found in
        # about PING_INTERVAL * (MAX_OUTSTANDING_PINGS + 1) s; nats-py's defaults (2 min, 2)
        # showed such a source running for some 6 minutes
        ping_interval=PING_INTERVAL,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        closed_cb=on_closed,
        error_cb=on_error,
        **auth,
    )


_C = TypeVar("_C", bound=NatsSourceSpec | JetStreamSourceSpec)


class _NatsConsumer(ABC, Generic[_C]):
    """What both NATS sources share: one connection per consume, reconnected with backoff.

    A subclass's ``_serve`` reads and publishes until the connection closes, calling
    ``backoff.reset()`` once it is reading.
    """

    def __init__(self, config: _C) -> None:
        """Raises ConfigError when a TLS or creds file cannot be read."""
        self.name = config.name
        self.type = config.type
        self.config = config
        self._auth = config.nats_options(f"{config.type} source {config.name!r}")

    async def run(self, ctx: SourceContext) -> None:
        """Consume until cancelled; reconnects with backoff when the server goes away."""
        await consume_forever(ctx, lambda backoff: self._consume(ctx, backoff), _TRANSIENT)

    async def _consume(self, ctx: SourceContext, backoff: Backoff) -> None:
        closed = asyncio.Event()
        if self.config.wants_tls(self.config.url):
            where = f"{self.config.type} source {self.config.name!r}"
            await refuse_nats_plaintext(self.config.url, where)  # PermissionError: backoff
        nc = await _connect(self.config.url, closed, self._auth)
        try:
            await self._serve(ctx, nc, closed, backoff)
        finally:
            await nc.close()
        raise ConnectionError(f"connection to {redact_url(self.config.url)} closed")

    @abstractmethod
    async def _serve(
        self, ctx: SourceContext, nc: Client, closed: asyncio.Event, backoff: Backoff
    ) -> None:
        """Read from ``nc`` and publish until ``closed`` is set."""


class NatsSource(_NatsConsumer[NatsSourceSpec]):
    """Subscribes to core NATS subjects; at-most-once (see the module docstring)."""

    @property
    def one_instance(self) -> bool:
        """Under a lease (see SourceRunner) without a queue group: every instance subscribed
        would get every message, and a raw one reached the targets once per instance, each
        time under another id. With one, the server hands each message to one member."""
        return self.config.queue_group is None

    async def _serve(
        self, ctx: SourceContext, nc: Client, closed: asyncio.Event, backoff: Backoff
    ) -> None:
        async def handle(msg: Msg) -> None:
            await self._publish(ctx, msg)

        for subject in self.config.subjects:
            await nc.subscribe(subject, queue=self.config.queue_group or "", cb=handle)
        await nc.flush()  # the server's answers to the subscriptions come before its PONG
        if nc.last_error is not None:
            # a subscription the server refused ("Permissions Violation for Subscription"):
            # the source showed running, and every message on that subject was lost
            raise nats.errors.Error(f"subscribing failed: {nc.last_error}")
        ctx.status.state = "running"
        backoff.reset()
        await closed.wait()

    async def _publish(self, ctx: SourceContext, msg: Msg) -> None:
        def convert() -> list[dict[str, Any]]:
            return events_of(
                self.config,
                msg.data,
                lambda size: from_nats(msg.headers, msg.data, max_size=size),
                max_size=ctx.max_event_size,
                subject=msg.subject,
            )

        # Core NATS will not redeliver, so the message is held here until the bus takes it.
        await publish_held(ctx, msg.data, convert, {"subject": msg.subject})


class JetStreamSource(_NatsConsumer[JetStreamSourceSpec]):
    """Reads a durable pull consumer; acks after publishing (at-least-once)."""

    async def _serve(
        self, ctx: SourceContext, nc: Client, closed: asyncio.Event, backoff: Backoff
    ) -> None:
        psub = await nc.jetstream().pull_subscribe(
            self.config.subject or "",
            durable=self.config.durable or f"eventbus-source-{self.name}",
            stream=self.config.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        ctx.status.state = "running"
        backoff.reset()
        while not closed.is_set():
            stop_if_cancelled()  # nats-py's fetch may lose a cancellation (3.11)
            try:
                batch = await psub.fetch(self.config.batch, timeout=1.0)
            except TimeoutError:
                # nothing to read: nats.errors.TimeoutError, or (nats-py 2.16, when its first
                # request took the whole timeout) a bare asyncio.TimeoutError, which was taken
                # for a broker failure: backoff, an error counted, the connection rebuilt
                continue
            outcomes = await publish_messages(ctx, [self._message(ctx, msg) for msg in batch])
            failure = next((o for o in outcomes if o is not None), None)
            for msg, outcome in zip(batch, outcomes, strict=True):
                if outcome is None:
                    await msg.ack()
                else:
                    # Give back what is not on the bus; it is redelivered after the backoff,
                    # to this or another instance.
                    await msg.nak()
            if batch:
                ctx.status.lag = batch[-1].metadata.num_pending
            if failure is None:
                backoff.reset()
                continue
            if not isinstance(failure, (BusError, StoreError)):
                raise failure
            ctx.report_error(failure)
            # what waits, those given back included (it said nothing while backing off)
            ctx.status.lag = (ctx.status.lag or 0) + sum(o is not None for o in outcomes)
            await backoff.wait()

    def _message(self, ctx: SourceContext, msg: Msg) -> Message:
        meta = msg.metadata

        def convert() -> list[dict[str, Any]]:
            return events_of(
                self.config,
                msg.data,
                lambda size: from_nats(msg.headers, msg.data, max_size=size),
                max_size=ctx.max_event_size,
                # the time the stream stored it too: a stream deleted and made again numbers
                # its messages from 1 again (see the kafka source)
                id=f"{meta.stream}/{meta.sequence.stream}/{_micros(meta.timestamp)}",
                subject=msg.subject,
                time=meta.timestamp,
            )

        where = {"stream": meta.stream, "sequence": meta.sequence.stream, "subject": msg.subject}
        return Message(msg.data, convert, where)


def _micros(at: datetime) -> int:
    """Microseconds since the epoch of the time JetStream stored a message."""
    return (at - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
