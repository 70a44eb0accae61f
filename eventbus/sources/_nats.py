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
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import nats
import nats.errors
import nats.js.errors
import pydantic
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.client import JetStreamContext

from eventbus._burst import Burst
from eventbus._errors import BusError, StoreError
from eventbus._tasks import stop_if_cancelled
from eventbus.cloudevents import from_nats
from eventbus.config import NatsAuth, redact_url, refuse_nats_plaintext
from eventbus.sources._base import SourceContext
from eventbus.sources._clock import Backoff
from eventbus.sources._queues import (
    Message,
    QueueSourceSpec,
    Whence,
    consume_forever,
    events_of,
    publish_held,
    publish_messages,
)

__all__ = ["JetStreamSource", "JetStreamSourceSpec", "NatsSource", "NatsSourceSpec"]

_TRANSIENT = (nats.errors.Error, OSError)
log = logging.getLogger("eventbus.sources")


# a stream's name: what the server accepts (nats-py refused "BAD.NAME" at every retry)
_STREAM_NAME = r"^[^.*>/\\ \t\r\n\f]+$"
_SERVER_SPACE = frozenset(" \t\r\n\f")  # what the server takes for white space


def _subscribable(subject: str) -> str:
    """``subject`` when the server takes a subscription to it: dot-separated tokens, none
    empty or with white space, ``>`` only as the last (the server's own check). Refused only
    when the source subscribed ("a..b", "a.>.b"), the source backed off for ever."""
    tokens = subject.split(".")
    if not all(t and not _SERVER_SPACE.intersection(t) for t in tokens) or ">" in tokens[:-1]:
        raise ValueError(
            "a subject is dot-separated tokens, none empty or with white space; '>' only as "
            f"the last: {subject!r}"
        )
    return subject


class NatsSourceSpec(QueueSourceSpec, NatsAuth):
    """YAML settings of a ``type: nats`` source (core NATS subscription); credentials and
    ``tls`` as every NATS connection (:class:`eventbus.config.NatsAuth`)."""

    url: str = pydantic.Field(pattern=r"^(nats|tls)://")
    subjects: list[str] = pydantic.Field(min_length=1)
    queue_group: str | None = None

    @pydantic.field_validator("subjects")
    @classmethod
    def _subjects(cls, subjects: list[str]) -> list[str]:
        return [_subscribable(subject) for subject in subjects]


class JetStreamSourceSpec(QueueSourceSpec, NatsAuth):
    """YAML settings of a ``type: jetstream`` source.

    ``durable`` defaults to ``eventbus-source-<name>``; ``subject`` filters the stream (all of
    it when unset); ``batch`` is how many messages one pull asks for.
    """

    url: str = pydantic.Field(pattern=r"^(nats|tls)://")
    stream: str = pydantic.Field(min_length=1, pattern=_STREAM_NAME)
    # a consumer's name: no ".", "*", ">", "/", "\\" or white space (refused by the server at
    # run time, the source backing off for ever)
    durable: str | None = pydantic.Field(None, pattern=r"^[^.*>/\\\s]+$")
    subject: str | None = None
    batch: int = pydantic.Field(100, ge=1, le=10_000)

    @pydantic.field_validator("subject")
    @classmethod
    def _subject(cls, subject: str | None) -> str | None:
        return None if subject is None else _subscribable(subject)

    @property
    def durable_name(self) -> str:
        """``durable``, or ``eventbus-source-<name>`` with what a consumer's name may not hold
        (a source name may have dots) as ``_``: the source never ran."""
        return self.durable or "eventbus-source-" + re.sub(r"[.*>/\\\s]", "_", self.name)


PING_INTERVAL = 10.0
FLOOR_EVERY = 10.0  # seconds between two reads of a jetstream source's consumer's ack floor
MAX_OUTSTANDING_PINGS = 2
DROPS_SAID_EVERY = 10.0  # seconds between two warnings of messages a slow consumer dropped


async def _connect(
    url: str,
    closed: asyncio.Event,
    auth: dict[str, Any],
    refused: list[Exception] | None = None,
    dropped: Callable[[nats.errors.SlowConsumerError], None] | None = None,
) -> Client:
    """A connection to ``url``; ``closed`` is set when it closes, and when the server refuses
    a subscription (kept in ``refused``, when given): such a refusal may come after the
    flush that follows the subscriptions (nats-py reads it in its own time), and the source
    showed running while every message on that subject was lost. ``dropped`` is told of each
    message nats-py drops because its subscription's buffer is full (a slow consumer)."""

    async def on_closed() -> None:
        closed.set()

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError) and dropped is not None:
            dropped(exc)
            return
        # The consume loop reports the failure that matters; nats-py's default handler would
        # print a traceback for every attempt.
        log.debug("nats %s: %r", redact_url(url), exc)
        if refused is not None and "violation for subscription" in str(exc).lower():
            refused.append(exc)
            closed.set()

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

    reports_running = True  # once connected and subscribed (see SourceRunner)
    _after_drop = "core NATS does not redeliver it"

    def __init__(self, config: _C) -> None:
        """Raises ConfigError when a TLS or creds file cannot be read."""
        self.name = config.name
        self.type = config.type
        self.config = config
        self._auth = config.nats_options(f"{config.type} source {config.name!r}")
        self._drops = Burst(self._tell_drops, DROPS_SAID_EVERY)

    async def run(self, ctx: SourceContext) -> None:
        """Consume until cancelled; reconnects with backoff when the server goes away."""
        try:
            await consume_forever(ctx, lambda backoff: self._consume(ctx, backoff), _TRANSIENT)
        finally:
            self._drops.flush()

    async def _consume(self, ctx: SourceContext, backoff: Backoff) -> None:
        closed = asyncio.Event()
        if self.config.wants_tls(self.config.url):
            where = f"{self.config.type} source {self.config.name!r}"
            await refuse_nats_plaintext(self.config.url, where)  # PermissionError: backoff
        refused: list[Exception] = []
        nc = await _connect(
            self.config.url, closed, self._auth, refused, lambda exc: self._dropped(ctx, exc)
        )
        try:
            await self._serve(ctx, nc, closed, backoff)
        finally:
            await nc.close()
        if refused:
            raise nats.errors.Error(f"subscribing failed: {refused[0]}")
        raise ConnectionError(f"connection to {redact_url(self.config.url)} closed")

    def _dropped(self, ctx: SourceContext, exc: nats.errors.SlowConsumerError) -> None:
        """nats-py dropped a message: the subscription's buffer was full (the bus slower than
        the subject for a while). It said so only at debug level: messages went missing
        while the source showed running, without an error."""
        ctx.status.errors += 1
        ctx.status.last_error = (
            f"slow consumer: a message on {exc.subject!r} was dropped, the subscription's "
            f"buffer full ({self._after_drop})"
        )
        self._drops(ctx.status.last_error)

    def _tell_drops(self, message: str, more: int) -> None:
        log.warning("%s source %s: %s; %d more dropped", self.type, self.name, message, more)

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
        ctx.connected()
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
        await publish_held(ctx, msg.data, convert, Whence({"subject": msg.subject}, msg.headers))


_CONSUMER_NOT_FOUND = 10014  # JetStream's err_code: the stream is there, the consumer not


class JetStreamSource(_NatsConsumer[JetStreamSourceSpec]):
    """Reads a durable pull consumer; acks after publishing (at-least-once)."""

    _after_drop = "unacked, JetStream redelivers it once the consumer's ack_wait has passed"

    def __init__(self, config: JetStreamSourceSpec) -> None:
        super().__init__(config)
        # The durable's ack floor (every message up to it acked, by any instance) as last read,
        # with the stream's creation time then: where a durable deleted while this process
        # read it is made again from (see _consumer).
        self._floor: tuple[datetime | None, int] | None = None

    async def _serve(
        self, ctx: SourceContext, nc: Client, closed: asyncio.Event, backoff: Backoff
    ) -> None:
        js = nc.jetstream()
        await self._consumer(js)
        psub = await js.pull_subscribe_bind(
            durable=self.config.durable_name, stream=self.config.stream
        )
        ctx.connected()
        backoff.reset()
        floor_read = time.monotonic()
        while not closed.is_set():
            stop_if_cancelled()  # nats-py's fetch may lose a cancellation (3.11)
            if time.monotonic() - floor_read >= FLOOR_EVERY:
                floor_read = time.monotonic()
                await self._read_floor(js, await psub.consumer_info())
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

    async def _consumer(self, js: JetStreamContext) -> None:
        """Make the durable consumer, or check the one there: explicit acks, pulled, the
        source's subject, no cap on redeliveries. One made beforehand with other settings
        was read as it was (acks none: a message given back on a bus failure was lost; a push
        consumer: nothing read; another filter: the subject asked for never read), the source
        running. One deleted while this process read it is made again after its ack floor as
        last read (from the stream's start, every message older than the bus's duplicate
        window reached the targets again), or from the first message of a stream made again
        (its creation time changed: its sequences started over)."""
        cfg = self.config
        durable = cfg.durable_name
        try:
            info = await js.consumer_info(cfg.stream, durable)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code != _CONSUMER_NOT_FOUND:
                raise  # the stream itself: backoff, "stream not found"
            start: dict[str, Any] = {"deliver_policy": DeliverPolicy.ALL}
            stream = await js.stream_info(cfg.stream)
            if self._floor is not None and stream.created and self._floor[0] == stream.created:
                # not a stream made again (its sequences start over): the messages after
                # the floor, those acked since included (within the bus's duplicate window)
                start = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE}
                start["opt_start_seq"] = self._floor[1] + 1
                log.warning(
                    "jetstream source %s: consumer %s of stream %s is gone; made again from"
                    " stream sequence %d, after its ack floor as last read",
                    self.name,
                    durable,
                    cfg.stream,
                    self._floor[1] + 1,
                )
            config = ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=cfg.subject or None,
                **start,
            )
            await js.add_consumer(cfg.stream, config)
            self._floor = (stream.created, start.get("opt_start_seq", 1) - 1)
            return
        problems = _unfit(info.config, cfg.subject)
        if problems:
            raise nats.errors.Error(
                f"consumer {durable} of stream {cfg.stream} exists with settings this source"
                f" cannot read it by: {'; '.join(problems)} (delete it, or give the source"
                " another durable)"
            )
        await self._read_floor(js, info)

    async def _read_floor(self, js: JetStreamContext, info: ConsumerInfo) -> None:
        """Keep the consumer's ack floor (``info``: its ConsumerInfo), with its stream's
        creation time."""
        stream = await js.stream_info(self.config.stream)
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        self._floor = (stream.created, floor)

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
        return Message(msg.data, convert, Whence(where, msg.headers))


def _unfit(config: ConsumerConfig, subject: str | None) -> list[str]:
    """What in an existing consumer's ``config`` the jetstream source cannot work with."""
    problems = []
    # an enum member or its text, as nats-py reads the server's answer
    policy = getattr(config.ack_policy, "value", config.ack_policy)
    if policy not in (None, AckPolicy.EXPLICIT.value):
        problems.append(f"ack_policy {policy} (explicit acks are needed)")
    if config.deliver_subject:
        problems.append("a push consumer (a pull consumer is needed)")
    filters = set(config.filter_subjects or ())
    if config.filter_subject:
        filters.add(config.filter_subject)
    wanted = {subject} if subject else set()
    if filters != wanted:
        have = ", ".join(sorted(filters)) or "every subject"
        problems.append(f"it filters {have}, the source reads {subject or 'every subject'}")
    if config.max_deliver not in (None, -1, 0):
        problems.append(
            f"max_deliver {config.max_deliver} (a message given back on each bus failure"
            " would be dropped after so many)"
        )
    return problems


def _micros(at: datetime) -> int:
    """Microseconds since the epoch of the time JetStream stored a message."""
    return (at - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
