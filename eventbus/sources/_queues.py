"""What every queue source shares: message → event conversion, and consume-with-backoff.

Place in the pipeline: a broker (Kafka, NATS, JetStream, RabbitMQ, MQTT) → a queue source
(``_kafka``, ``_nats``, ``_rabbitmq``, ``_mqtt``, each the same shape: a spec, the source, its
consume loop) → :func:`publish_message` → the bus. Only after :func:`publish_message`
returns does a source acknowledge the message to its broker; a message that cannot become an
event is kept in ``source_dead_letters`` and then acknowledged, so it neither blocks the stream
nor vanishes. (Publishing, not delivering: delivery is what the dispatcher does to targets.)

Formats: ``cloudevents`` (the message is a CloudEvent in the broker's binding, or structured
JSON), ``s3-notification`` (an S3/MinIO or OSS bucket notification, mapped by
``eventbus.cloudevents``; one message may become several events) and ``raw`` (the payload is
wrapped: JSON if it parses, else UTF-8 text, else base64, with the configured ``event_type`` and
``event_source``).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NamedTuple

import orjson
import pydantic

from eventbus._errors import BusError, CloudEventError, EventTooLargeForBus, StoreError
from eventbus._tasks import stop_if_cancelled
from eventbus.cloudevents import (
    DEFAULT_MAX_EVENT_SIZE,
    as_attribute,
    load_json,
    new_event,
    notification_to_events,
)
from eventbus.config import SourceSpec
from eventbus.sources._base import SourceContext
from eventbus.sources._clock import Backoff

__all__ = [
    "Message",
    "QueueSourceSpec",
    "Whence",
    "consume_forever",
    "events_of",
    "publish_held",
    "publish_message",
    "publish_messages",
    "raw_event",
]

log = logging.getLogger(__name__)


class QueueSourceSpec(SourceSpec):
    """Settings every queue source has: how a message becomes an event."""

    format: Literal["cloudevents", "s3-notification", "raw"] = "cloudevents"
    event_type: str | None = None
    event_source: str | None = None

    @pydantic.model_validator(mode="after")
    def _raw_needs_type_and_source(self) -> QueueSourceSpec:
        if self.format == "raw" and not (self.event_type and self.event_source):
            raise ValueError("format 'raw' needs both 'event_type' and 'event_source'")
        return self


def raw_event(
    config: QueueSourceSpec,
    payload: bytes,
    *,
    id: str | None = None,
    subject: str | None = None,
    time: datetime | None = None,
    max_size: int = DEFAULT_MAX_EVENT_SIZE,
) -> dict[str, Any]:
    """Wrap an opaque payload as an event of the configured type and source (at most
    ``max_size`` bytes).

    JSON payloads become ``data``; other UTF-8 text becomes ``data`` with ``text/plain``;
    anything else goes to ``data_base64``. ``id`` defaults to a fresh uuid (use a broker
    position where there is one, so a redelivery keeps its id). Raises CloudEventError.
    """
    if config.event_type is None or config.event_source is None:
        raise CloudEventError("format 'raw' needs event_type and event_source")
    common: dict[str, Any] = {
        "type": config.event_type,
        "source": config.event_source,
        "id": id or None,
        # a fanout's empty routing key, a binary Kafka key: no subject
        "subject": as_attribute(subject),
        "time": time,
        "max_size": max_size,
    }
    try:
        # an integer beyond 64 bits: CloudEventError, dead-lettered (read as a float it would
        # change)
        return new_event(data=load_json(payload), **common)
    except orjson.JSONDecodeError:
        pass
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return new_event(data=payload, datacontenttype="application/octet-stream", **common)
    return new_event(data=text, datacontenttype="text/plain; charset=utf-8", **common)


def events_of(
    config: QueueSourceSpec,
    payload: bytes,
    cloudevent: Callable[[int], dict[str, Any]],
    *,
    max_size: int,
    id: str | None = None,
    subject: str | None = None,
    time: datetime | None = None,
) -> list[dict[str, Any]]:
    """The events one message carries in the configured format, each of at most ``max_size``
    bytes (the service's ``max_event_size``); raises CloudEventError.

    ``cloudevent(max_size)`` reads the message in its broker's CloudEvents binding; ``id``,
    ``subject`` and ``time`` are used by the ``raw`` format only (see :func:`raw_event`).
    """
    if config.format == "cloudevents":
        return [cloudevent(max_size)]
    if config.format == "s3-notification":
        return notification_to_events(payload, max_size=max_size)
    return [raw_event(config, payload, id=id, subject=subject, time=time, max_size=max_size)]


async def publish_message(
    ctx: SourceContext,
    payload: bytes,
    convert: Callable[[], list[dict[str, Any]]],
    meta: Mapping[str, Any],
) -> bool:
    """Publish the events ``convert`` makes of one message, or dead-letter the message.

    Returns True when published, False when the message was dead-lettered (``convert`` raised
    CloudEventError); either way the caller may now acknowledge it. Raises BusError (nothing may
    be acknowledged; some of a multi-event message may be on the bus already, which a redelivery
    repeats with the same ids) or StoreError (the dead letter was not written: do not ack).
    """
    events = await _converted(ctx, payload, convert, meta)
    if events is None:
        return False
    try:
        for event in events:
            await ctx.emit(event)
    except EventTooLargeForBus as exc:
        # The broker will never take it (the bus's message limit is below it): retried, it
        # held the source on this message for ever.
        await ctx.dead_letter(payload, str(exc), meta)
        return False
    return True


MAX_KEPT_HEADERS = 64
"""Headers of a message kept with its dead letter (the first ones; ``headers_kept`` says so)."""
MAX_KEPT_HEADER_VALUE = 4096
"""Bytes of a header value (or a Kafka key) kept with a dead letter."""


def _kept(value: Any) -> dict[str, Any]:
    """A header value (or key) for a dead letter's ``meta``: ``value`` as text when it is, else
    ``value_base64``; ``truncated`` when longer than ``MAX_KEPT_HEADER_VALUE``."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        kept: dict[str, Any] = {}
        if len(raw) > MAX_KEPT_HEADER_VALUE:
            raw = raw[:MAX_KEPT_HEADER_VALUE]
            kept["truncated"] = True
        try:
            kept["value"] = raw.decode()
        except UnicodeDecodeError:
            kept["value_base64"] = base64.b64encode(raw).decode()
        return kept
    if (
        value is None
        or isinstance(value, bool | float)
        or (isinstance(value, int) and -(2**63) <= value < 2**63)
    ):
        return {"value": value}  # typed, as an AMQP header table holds them
    if isinstance(value, str):
        text = value
    elif isinstance(value, datetime):
        text = value.isoformat()
    else:  # a nested AMQP table or array: as JSON
        try:
            text = orjson.dumps(value, default=str).decode()
        except TypeError:
            text = str(value)
    if len(text) > MAX_KEPT_HEADER_VALUE:
        return {"value": text[:MAX_KEPT_HEADER_VALUE], "truncated": True}
    return {"value": text}


class Whence(Mapping[str, Any]):
    """Where a message came from, kept with its dead letter: ``where`` as given, and the
    message's ``headers`` (a mapping, or name, value pairs) and Kafka ``key``, rendered when
    first read. A
    binary-mode CloudEvent has its attributes in its headers: without them, a record set aside
    as invalid (``ce_id`` missing, say) showed only its data, and no one could tell why or send
    it again. Only a dead letter reads this: a message that becomes an event costs nothing."""

    def __init__(
        self,
        where: Mapping[str, Any],
        headers: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        key: bytes | None = None,
    ) -> None:
        self._where = where
        self._headers = headers
        self._key = key
        self._all: dict[str, Any] | None = None

    def _rendered(self) -> dict[str, Any]:
        if self._all is None:
            rendered = dict(self._where)
            if self._key is not None:
                rendered["key"] = _kept(self._key)
            if self._headers:
                headers = self._headers
                pairs = list(headers.items() if isinstance(headers, Mapping) else headers)
                rendered["headers"] = [
                    {"name": str(name), **_kept(value)} for name, value in pairs[:MAX_KEPT_HEADERS]
                ]
                if len(pairs) > MAX_KEPT_HEADERS:
                    rendered["headers_kept"] = f"{MAX_KEPT_HEADERS} of {len(pairs)}"
            self._all = rendered
        return self._all

    def __getitem__(self, name: str) -> Any:
        return self._rendered()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rendered())

    def __len__(self) -> int:
        return len(self._rendered())


class Message(NamedTuple):
    """One message of a fetched batch, as :func:`publish_messages` takes it: its payload, how
    it becomes events, and where it came from (kept with its dead letter)."""

    payload: bytes
    convert: Callable[[], list[dict[str, Any]]]
    meta: Mapping[str, Any]


async def publish_messages(
    ctx: SourceContext, messages: Sequence[Message]
) -> list[BaseException | None]:
    """:func:`publish_message` for a fetched batch, its events published in one call: one
    outcome per message, in order. None: the message may be acknowledged (its events are on
    the bus, or it was dead-lettered); else the BusError (nothing of it may be acknowledged;
    some of its events may be on the bus) or StoreError (its dead letter was not written)."""
    outcomes: list[BaseException | None] = [None] * len(messages)
    events: list[dict[str, Any]] = []
    owners: list[int] = []
    for i, message in enumerate(messages):
        try:
            made = await _converted(ctx, *message)
        except StoreError as exc:
            outcomes[i] = exc
            continue
        for event in made or ():
            events.append(event)
            owners.append(i)
    too_large: dict[int, BaseException] = {}
    for owner, outcome in zip(owners, await ctx.emit_many(events), strict=True):
        if isinstance(outcome, EventTooLargeForBus):
            too_large.setdefault(owner, outcome)
        elif outcome is not None and outcomes[owner] is None:
            outcomes[owner] = outcome
    for owner, refusal in too_large.items():
        if outcomes[owner] is None:
            # never taken by the bus (see publish_message): set aside, or it held the source
            message = messages[owner]
            try:
                await ctx.dead_letter(message.payload, str(refusal), message.meta)
            except StoreError as failed:
                outcomes[owner] = failed
    return outcomes


async def _converted(
    ctx: SourceContext,
    payload: bytes,
    convert: Callable[[], list[dict[str, Any]]],
    meta: Mapping[str, Any],
) -> list[dict[str, Any]] | None:
    """The events ``convert`` makes, or None once the message is dead-lettered for what
    stopped it. Raises StoreError when the dead letter was not written."""
    try:
        return convert()
    except CloudEventError as exc:
        await ctx.dead_letter(payload, str(exc), meta)
    except Exception as exc:  # one unreadable message must not stop the source
        # Not a message the binding refuses but one the reading failed on: set aside like one,
        # or the source would restart on it for ever (redelivered from the same position).
        log.exception("cannot read a message (%s): dead-lettered", dict(meta))
        await ctx.dead_letter(payload, f"cannot read the message: {exc!r}", meta)
    return None


async def publish_held(
    ctx: SourceContext,
    payload: bytes,
    convert: Callable[[], list[dict[str, Any]]],
    meta: Mapping[str, Any],
    given_back: Callable[[], bool] = lambda: False,
) -> bool:
    """:func:`publish_message`, holding the message until the bus and the database take it:
    for a message its broker will not send again (core NATS, MQTT at QoS 0; dropped with the
    connection, it was lost) or whose redelivery would cost a reconnect (MQTT at QoS 1: each
    reconnect every half second had the broker resend its whole in-flight window). Each
    failure is reported in the status; retried after a capped backoff, with the events the
    first try made: converted again, a message without an id of its own (raw MQTT or core
    NATS) got a fresh random id on each try, so a publish that timed out but was stored, then
    retried, reached the targets twice under two ids."""
    made: list[list[dict[str, Any]]] = []

    def once() -> list[dict[str, Any]]:
        if not made:
            made.append(convert())
        return made[0]

    retry = Backoff(ctx.clock)
    while True:
        try:
            return await publish_message(ctx, payload, once, meta)
        except (BusError, StoreError) as exc:
            ctx.report_error(exc)
            await retry.wait()
        if given_back():
            # Its broker has it again (``given_back``: the channel it came on closed) and
            # sends it anew: published from here too, it went twice (a raw one without an id
            # of its own under two ids).
            raise ConnectionError("the connection closed while a message was held")


async def consume_forever(
    ctx: SourceContext,
    consume: Callable[[Backoff], Awaitable[None]],
    transient: tuple[type[BaseException], ...],
) -> None:
    """Run ``consume`` (connect, then read and publish) again and again until cancelled.

    ``consume`` calls ``backoff.reset()`` once it is connected. Broker, bus and store failures
    (``transient`` plus BusError and StoreError) are reported in the status (``backoff``) and
    retried after a capped exponential backoff on a fresh connection, which also makes the
    broker redeliver whatever was not acknowledged. Anything else propagates to the runner.
    """
    backoff = Backoff(ctx.clock)
    retry: tuple[type[BaseException], ...] = (BusError, StoreError, *transient)
    while True:
        stop_if_cancelled()
        try:
            await consume(backoff)
        except retry as exc:
            ctx.report_error(exc)
        else:
            ctx.report_error(ConnectionError("the broker ended the subscription"))
        await backoff.wait()
