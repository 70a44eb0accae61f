"""The durable bus contract: what ingest publishes into and what the router consumes from.

Every event accepted by eventbus passes through a :class:`Bus` (JetStream or Kafka) between
normalisation and routing. ``publish`` returns only once the broker has stored the event;
``messages`` hands out work shared by every process using the same durable/group name, with
at-least-once delivery: a message is redelivered until someone acks it.

This module also holds the pieces both backends share: the wire encoding (the structured
CloudEvents JSON of the event) and the in-flight window that bounds un-acked messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self

from eventbus._errors import BusError, BusUnavailable, CloudEventError, ConfigError, FailureRun
from eventbus._tasks import wait_event
from eventbus.cloudevents import encode, event_key, parse_json, validate

__all__ = [
    "DIRECT",
    "DUPLICATE",
    "MAX_BUS_MESSAGE",
    "PUBLISHES_STALL_AFTER",
    "STALL_AFTER",
    "Behind",
    "Bus",
    "BusMessage",
    "DecodedMessage",
    "InFlightWindow",
    "PublishOutcome",
    "bus_message_limit",
    "collect_acks",
    "note_publishes",
    "publishes_failing",
    "require_positive",
    "wire_decode",
    "wire_encode",
]


DIRECT = "bus"
"""The ``via`` of an event published straight onto the bus by a caller that did not say."""

_NO_SIZE_LIMIT = 2**62

_ONE_MIB = 1024 * 1024
MAX_BUS_MESSAGE = 64 * _ONE_MIB
"""The largest bus message eventbus asks a broker to take (nats-server's ceiling)."""


def bus_message_limit(max_event_size: int) -> int:
    """The bus message size that carries any event of ``max_event_size`` bytes: six times it
    (a text body of control characters, each escaped in the bus's JSON; base64 grows binary
    data by a third) plus 64 KiB, at least the brokers' usual 1 MiB, at most
    :data:`MAX_BUS_MESSAGE`."""
    return min(MAX_BUS_MESSAGE, max(_ONE_MIB, 6 * max_event_size + 64 * 1024))


DUPLICATE: Final = "duplicate"
"""The outcome of a publish the bus took as a repeat: an event with the same source+id was
stored within the duplicate window, so this one was not stored again (and is not delivered)."""

PublishOutcome = BaseException | Literal["duplicate"] | None
"""One event's outcome of :meth:`Bus.publish_many`: None when stored, :data:`DUPLICATE` when
the bus already held it, else the BusError or BusUnavailable that prevented storing it. (A
string, so the edge can tell it without importing the bus.)"""


class BusMessage(Protocol):
    """One message handed out by :meth:`Bus.messages`; settle it with exactly one ack or nak.

    ``rejected`` is None for a valid CloudEvent (then in ``event``); otherwise it says why the
    payload is not one (``event`` is then empty) and the message must be set aside, never
    routed: only eventbus itself should write to its bus, but a payload is checked, not trusted.
    """

    event: dict[str, Any]
    payload: bytes
    """The message as stored on the bus (the structured CloudEvents JSON)."""
    rejected: str | None
    via: str
    """How the event reached the bus (``http``, ``source:<name>``, ``reply`` ...), as its
    publisher declared it."""
    published_at: datetime
    """When the broker stored the message."""
    ref: str
    """Identifies this bus message (not the event): equal across redeliveries of it."""
    deliveries: int
    """1 on the first delivery, more on each redelivery."""

    async def in_progress(self) -> None:
        """Still working on it: do not redeliver it to another consumer yet (a long delivery
        must not be mistaken for a dead consumer). Never raises."""

    async def ack(self) -> None:
        """Mark the event done: it is never delivered again to this durable/group."""

    async def nak(self, delay: float | None = None) -> None:
        """Mark the event not done: it is delivered again, after ``delay`` seconds if given."""


class Bus(Protocol):
    """A durable event log shared by every eventbus process (async context manager)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def publish(
        self, event: dict[str, Any], *, via: str = DIRECT, scope: str | None = None
    ) -> bool:
        """Store one event durably (or find it already stored: a duplicate, True); raises
        BusUnavailable (retry later) or BusError.

        ``via`` travels with the message (see :attr:`BusMessage.via`). A bus that drops a
        re-published source+id (JetStream's duplicate window) drops it only among publishes of
        the same ``scope``: an invocation of one target is not a duplicate of the same event
        published for the rules, or invoked on another target."""

    async def publish_many(
        self, events: Sequence[dict[str, Any]], *, via: str = DIRECT
    ) -> list[PublishOutcome]:
        """Store many events concurrently; one outcome per event, in order.

        A backend that drops repeats (JetStream) reports a dropped one as :data:`DUPLICATE`;
        one that stores every publish (Kafka) never does: the outcome says what the bus did.
        """

    def messages(self) -> AsyncIterator[BusMessage]:
        """Yield events to process, never more than ``max_in_flight`` un-settled at a time."""

    async def ping(self) -> bool:
        """True when the broker answers right now."""

    def stalled(self) -> str | None:
        """Why the bus makes no progress though the broker answers (readiness reports it), or
        None."""


def require_positive(config: object, *names: str) -> None:
    """Raise ConfigError naming the first of ``names`` whose value on ``config`` is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"{type(config).__name__}.{name} must be positive, got {value!r}")


def wire_encode(event: dict[str, Any]) -> tuple[bytes, str]:
    """Return the bus payload (structured CloudEvents JSON) and the source+id dedup key.

    Raises BusError when the event is not a dict with ``source`` and ``id`` or cannot be
    encoded: nothing is published in that case.
    """
    if not isinstance(event, dict) or "source" not in event or "id" not in event:
        raise BusError("cannot publish event: it must be a dict with 'source' and 'id'")
    try:
        return encode(event), event_key(event)
    except CloudEventError as exc:
        raise BusError(f"cannot publish event: {exc}") from exc


def wire_decode(payload: bytes) -> tuple[dict[str, Any], str | None]:
    """Read a bus payload: ``(event, None)`` for a valid CloudEvent, ``({}, why)`` otherwise.

    The event is validated again (anyone able to reach the broker could have written the
    message) against every rule but those that may have come since it was accepted: a size
    limit lowered, a rule on its data (``stored``). Either must not turn away an event answered
    202 before.
    """
    try:
        event = parse_json(payload)
        return validate(event, max_size=_NO_SIZE_LIMIT, size=len(payload), stored=True), None
    except CloudEventError as exc:
        return {}, f"not a valid CloudEvent: {exc}"


class DecodedMessage:
    """What every backend's message carries (see :class:`BusMessage`), its payload read once;
    the backends' message classes add how to settle it."""

    __slots__ = ("deliveries", "event", "payload", "published_at", "ref", "rejected", "via")

    def __init__(
        self, payload: bytes, *, via: str, published_at: datetime, ref: str, deliveries: int
    ) -> None:
        self.payload = payload
        self.event, self.rejected = wire_decode(payload)
        self.via = via
        self.published_at = published_at
        self.ref = ref
        self.deliveries = deliveries


PUBLISHES_STALL_AFTER = 10.0
"""Seconds of publishes failing in a row (the last within as long) before readiness says so."""


def note_publishes(run: FailureRun, results: Sequence[PublishOutcome], after: float) -> None:
    """Keep ``run``, a bus's publishes failing in a row, up to date with one call's
    ``results``: any event stored ends it, one the broker could not take (BusUnavailable)
    extends it, or begins a new one when the last failure is more than ``after`` s old (no
    publish since: one failure after a quiet hour was "failing for an hour"); an event
    refused for itself (a BusError) says nothing about the broker."""
    failure = None
    for result in results:
        if result is None or result is DUPLICATE:
            run.ended()
            return
        if failure is None and isinstance(result, BusUnavailable):
            failure = result
    if failure is not None:
        run.failed(failure, new=time.monotonic() - run.at > after)


def publishes_failing(run: FailureRun, after: float) -> str | None:
    """Readiness's reason while publishes have failed for ``after`` s, the last of them
    within as long, or None. A broker that answers every request but stores
    nothing (its disk full, and stuck so once space was freed) kept readiness green while
    every publish answered 503. With no publish since, the run is not news: it stays shown
    only that long."""
    lasted = run.still_longer_than(after)
    return None if lasted is None else f"publishes failing for {lasted:.0f} s: {run.last}"


async def collect_acks(
    pending: dict[asyncio.Future[Any], int],
    results: list[PublishOutcome],
    within: float,
    translate: Callable[[BaseException], BusError],
    duplicate: Callable[[Any], bool] | None = None,
) -> None:
    """Wait up to ``within`` s for the broker acks of pipelined publishes and record outcomes.

    ``pending`` maps each publish future to its index in ``results``; a failed one is recorded
    as ``translate(exc)``, an ack for which ``duplicate(ack)`` is true as :data:`DUPLICATE`. A
    future without an answer in time is cancelled and recorded as ``translate(TimeoutError)``,
    which must be a BusUnavailable (the broker may still store it).
    """
    if not pending:
        return
    if len(pending) == 1:  # one event (the common publish): without asyncio.wait's machinery
        ((future, index),) = pending.items()
        results[index] = await _one_ack(future, within, translate, duplicate)
        return
    done, late = await asyncio.wait(pending, timeout=within)
    for future in late:
        future.cancel()
        results[pending[future]] = translate(TimeoutError(f"no ack within {within} s"))
    for future in done:
        results[pending[future]] = _outcome(future, translate, duplicate)


def _outcome(
    future: asyncio.Future[Any],
    translate: Callable[[BaseException], BusError],
    duplicate: Callable[[Any], bool] | None,
) -> PublishOutcome:
    """The outcome of one publish whose future is done."""
    if future.cancelled():
        return translate(TimeoutError("cancelled: the bus is closing"))
    if (exc := future.exception()) is not None:
        return translate(exc)
    if duplicate is not None and duplicate(future.result()):
        return DUPLICATE
    return None


async def _one_ack(
    future: asyncio.Future[Any],
    within: float,
    translate: Callable[[BaseException], BusError],
    duplicate: Callable[[Any], bool] | None,
) -> PublishOutcome:
    """:func:`collect_acks` for one future: its outcome, the same as the general case's."""
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = future.cancel()  # False when the ack came first

    timer = asyncio.get_running_loop().call_later(within, expire)
    try:
        await future
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this caller was cancelled, not the publish
    except Exception:
        pass  # the future holds it: _outcome translates it
    finally:
        timer.cancel()
    if expired:
        return translate(TimeoutError(f"no ack within {within} s"))
    return _outcome(future, translate, duplicate)


class InFlightWindow:
    """Counts messages handed out but not settled, so a consumer never holds more than ``limit``.

    This is the bus's backpressure: the consumer loop asks :meth:`room` before fetching and
    fetches at most that many, so memory stays bounded however fast the broker delivers.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.released_at = time.monotonic()  # the last settle: room to fetch since then
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.limit - self.count

    def take(self, n: int = 1) -> None:
        self.count += n

    def release(self) -> None:
        self.count -= 1
        self.released_at = time.monotonic()
        self._changed.set()

    def poke(self) -> None:
        """Wake :meth:`wait` without changing the count (new local work is ready)."""
        self._changed.set()

    async def wait(self, at_most: float) -> None:
        """Wait until a slot is released or :meth:`poke` is called, at most ``at_most`` s."""
        self._changed.clear()
        await wait_event(self._changed, at_most)


STALL_AFTER = 30.0
"""Seconds a consumer with room may receive nothing while its broker says events wait for it
before readiness reports the bus stalled."""


class Behind:
    """How many events the broker said were waiting for this consumer (beyond those it had
    handed out), as of the last message or the last check: a consumer with room that receives
    nothing while some wait is stalled. A broker answering every request but handing out
    nothing (a paused consumer; a fetch wait shorter than a slow broker's reads) kept
    readiness green while events were accepted and none was routed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._waiting = 0
        self.at = clock()  # the last message received
        # when events began to wait (the count went from none to some): a consumer idle for
        # minutes before a burst was reported stalled "for 114 s" within a second of it, and
        # every instance out of readiness at once
        self.since = self.at

    @property
    def waiting(self) -> int:
        return self._waiting

    @waiting.setter
    def waiting(self, count: int) -> None:
        if count > 0 >= self._waiting:
            self.since = self._clock()
        self._waiting = count

    def received(self, waiting: int) -> None:
        self.waiting = waiting
        self.at = self._clock()

    def idle(self, window: InFlightWindow) -> float:
        """Seconds the consumer has had room, events have waited, and it received nothing."""
        return self._clock() - max(self.at, window.released_at, self.since)

    def stalled(self, window: InFlightWindow, after: float) -> str | None:
        """Why the consumer is stalled, or None."""
        if self.waiting <= 0 or window.free <= 0:
            return None
        idle = self.idle(window)
        if idle < after:
            return None
        return (
            f"{self.waiting} events wait on the broker for this consumer, and none has come "
            f"for {idle:.0f} s though it has room"
        )
