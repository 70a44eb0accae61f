"""The JetStream bus: the embedded default between ingest and the router.

Layout: one file-backed stream (``EVENTBUS``) captures one subject; every event is a message
whose payload is the event's structured CloudEvents JSON and whose ``Nats-Msg-Id`` header is the
event's source+id key, so JetStream drops a republished event inside the duplicate window.
Routers share one durable pull consumer: every process pulling from it gets a disjoint part of
the work, and a message not acked within ``ack_wait`` (crash, nak) is delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    Header,
    PubAck,
    StorageType,
    StreamConfig,
)

from eventbus._errors import (
    BusError,
    BusUnavailable,
    ConfigError,
    EventTooLargeForBus,
    FailureRun,
)
from eventbus._tasks import stop_if_cancelled
from eventbus.bus._base import (
    DIRECT,
    DUPLICATE,
    PUBLISHES_STALL_AFTER,
    STALL_AFTER,
    Behind,
    BusMessage,
    DecodedMessage,
    InFlightWindow,
    PublishOutcome,
    bus_message_limit,
    collect_acks,
    note_publishes,
    publishes_failing,
    require_positive,
    wire_encode,
)
from eventbus.cloudevents import DEFAULT_MAX_EVENT_SIZE
from eventbus.config import NatsAuth, redact_url, refuse_nats_plaintext

__all__ = ["NatsBus", "NatsBusConfig"]

log = logging.getLogger("eventbus.bus")

# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_EXISTS_DIFFERENT = 10058
_RECONNECT_WAIT = 1
_VIA = "Eventbus-Via"


@dataclass(frozen=True, slots=True)
class NatsBusConfig:
    """Where the JetStream bus lives and how it delivers.

    ``max_in_flight`` bounds un-settled messages per :meth:`NatsBus.messages` iterator;
    ``max_deliver`` -1 means redeliver forever; ``max_age`` is how long the stream keeps events
    (seconds); ``fetch_timeout`` is the long-poll length of one pull, which is also how quickly
    an idle consumer notices the bus closing; ``fetch_linger`` is how long a pull waits to fill
    its batch once the first message is there (the latency a trickle of events pays).
    ``auth`` holds the credentials and TLS block of an external server (the embedded one's are
    in its URL).
    """

    url: str
    stream: str = "EVENTBUS"
    subject: str = "eventbus.events"
    durable: str = "eventbus-router"
    max_in_flight: int = 1000
    ack_wait: float = 30.0
    max_deliver: int = -1
    duplicate_window: float = 120.0
    max_age: float = 7 * 24 * 3600.0
    replicas: int = 1
    fetch_batch: int = 256
    fetch_timeout: float = 1.0
    fetch_linger: float = 0.005
    publish_timeout: float = 5.0
    connect_timeout: float = 5.0
    auth: NatsAuth | None = None
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE

    def __post_init__(self) -> None:
        """Raises ConfigError when the URL is empty or a count or duration is not positive."""
        if not self.url:
            raise ConfigError("NatsBusConfig.url must be a nats:// URL, got an empty string")
        require_positive(
            self,
            "max_in_flight",
            "ack_wait",
            "duplicate_window",
            "max_age",
            "replicas",
            "fetch_batch",
            "fetch_timeout",
            "fetch_linger",
            "publish_timeout",
            "connect_timeout",
        )


def _translate(exc: BaseException, doing: str) -> BusError:
    """Map a nats-py error to BusUnavailable (try again later) or BusError (will not help)."""
    unavailable = (
        TimeoutError,
        OSError,
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.ConnectionDrainingError,
        nats.errors.NoServersError,
        nats.errors.NoRespondersError,
        nats.errors.StaleConnectionError,
        nats.errors.OutboundBufferLimitError,
        nats.js.errors.NoStreamResponseError,
        nats.js.errors.ServiceUnavailableError,
    )
    kind = BusUnavailable if isinstance(exc, unavailable) else BusError
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        # its repr is empty: "ServiceUnavailableError()" for a full stream
        why = f"JetStream answered {exc.code}: {exc.description} (err_code {exc.err_code})"
        return kind(f"NATS {doing} failed: {why}")
    return kind(f"NATS {doing} failed: {exc!r}")


_API_ERRORS: dict[int, type[nats.js.errors.APIError]] = {
    400: nats.js.errors.BadRequestError,
    404: nats.js.errors.NotFoundError,
    500: nats.js.errors.ServerError,
    503: nats.js.errors.ServiceUnavailableError,
}


class _Acks:
    """JetStream's answers to the bus's publishes, on an inbox of its own.

    nats-py's ``publish_async`` loses an error answer: its reply handler raises the APIError
    instead of setting it on the publish's future, so a stream that refused an event (full,
    with ``discard: new``) was reported as "no ack within 5.0 s" after ``publish_timeout``,
    the cause only in a log line. Here every answer settles its publish: a PubAck, the
    stream's error, or "no responders" (no stream captures the subject).
    """

    def __init__(self) -> None:
        self._prefix = ""
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}
        self._next = 0

    async def open(self, nc: Client) -> None:
        self._prefix = nc.new_inbox() + "."
        await nc.subscribe(self._prefix + "*", cb=self._answer)

    def expect(self) -> tuple[str, asyncio.Future[PubAck]]:
        """A reply subject for one publish and the future its answer settles."""
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        future.add_done_callback(lambda _: self._waiting.pop(token, None))
        return self._prefix + token, future

    async def _answer(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return  # given up on (its publish timed out), or a stray message
        if msg.headers and msg.headers.get(Header.STATUS) == "503":
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            answer = orjson.loads(msg.data)
            if not isinstance(answer, dict):
                raise ValueError(f"not a JSON object: {msg.data[:200]!r}")
            error = answer.get("error")
            if isinstance(error, dict):
                code = error.get("code")
                kind = _API_ERRORS.get(code, nats.js.errors.APIError)  # type: ignore[arg-type]
                future.set_exception(
                    kind(
                        code=code,
                        description=error.get("description"),
                        err_code=error.get("err_code"),
                    )
                )
                return
            future.set_result(PubAck.from_response(answer))
        except (ValueError, TypeError, KeyError) as exc:  # orjson.JSONDecodeError: ValueError
            future.set_exception(BusError(f"JetStream answered a publish with {exc}"))


def _refuse_dropping(stream: StreamConfig) -> None:
    """Raise BusError for a stream that makes room by dropping its oldest messages: it would
    drop events answered 202 that the router had not read yet, with no trace anywhere (63 of
    300 in a review, the service ready throughout). With ``discard: new`` a full stream
    refuses new events instead (503, the publisher retries); its per-subject limit only with
    ``discard_new_per_subject`` too (the bus publishes on one subject: without it that limit
    dropped the oldest whatever the discard policy)."""
    drops_old = stream.discard in (None, DiscardPolicy.OLD)
    limits = {
        "max_msgs": (stream.max_msgs, drops_old),
        "max_bytes": (stream.max_bytes, drops_old),
        "max_msgs_per_subject": (
            stream.max_msgs_per_subject,
            drops_old or not stream.discard_new_per_subject,
        ),
    }
    limited = [
        f"{name} {value}"
        for name, (value, dropping) in limits.items()
        if dropping and value is not None and value > 0
    ]
    if limited:
        raise BusError(
            f"stream {stream.name} drops its oldest messages when full ({', '.join(limited)}, "
            f"discard: {'old' if drops_old else 'new without discard_new_per_subject'}): events "
            "answered 202 would be lost before they are routed; set its discard policy to new "
            "(and discard_new_per_subject with max_msgs_per_subject: a full stream then refuses "
            "new events, 503) or remove the limit"
        )


def _refused(exc: BaseException) -> bool:
    """The server refused the credentials (nats-py reports its -ERR as a plain Error)."""
    return isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    )


async def _hand_back(batch: deque[Msg]) -> None:
    """Nak fetched messages nobody took, so they are redelivered now rather than after ack_wait."""
    while batch:
        with contextlib.suppress(nats.errors.Error):
            await batch.popleft().nak()


_LATE_WAIT = 0.05
"""Seconds to wait for each message already queued for a pull that gave up waiting."""


async def _hand_back_late(psub: JetStreamContext.PullSubscription) -> None:
    """Nak what arrived for a pull after it stopped waiting (a linger of 5 ms ran out first on
    a busy loop): it waits in the subscription's queue for the next fetch, which an iterator
    that ends never makes, and waited out ack_wait (30 s) instead. Such a fetch takes the
    queue's messages without asking the server."""
    late: deque[Msg] = deque()
    while psub.pending_msgs > 0:
        try:
            late.extend(await psub.fetch(1, timeout=_LATE_WAIT))
        except (TimeoutError, nats.errors.Error):
            break
    await _hand_back(late)


class _NatsMessage(DecodedMessage):
    __slots__ = ("_bus", "_raw", "_settled", "_window")

    def __init__(self, raw: Msg, window: InFlightWindow, bus: NatsBus) -> None:
        meta = raw.metadata
        published_at = meta.timestamp or datetime.now(UTC)
        super().__init__(
            raw.data,
            via=(raw.headers or {}).get(_VIA, DIRECT),
            published_at=published_at,
            # The stream sequence names the message; the store time tells apart a sequence
            # reused by a stream that was deleted and made again.
            ref=f"nats:{meta.stream}:{meta.sequence.stream}:{published_at.timestamp()}",
            deliveries=meta.num_delivered or 1,
        )
        self._raw = raw
        self._window = window
        self._bus = bus
        self._settled = False

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._window.release()
        self._bus._unsettled.discard(self)
        return True

    async def ack(self) -> None:
        """Ack once; later calls (and calls after the bus handed it back on close) do nothing.

        Raises BusUnavailable when the connection is closed; JetStream then redelivers the
        message after ``ack_wait``.
        """
        if self._settle():
            try:
                await self._raw.ack()
            except nats.errors.Error as exc:
                raise _translate(exc, "ack") from exc

    async def in_progress(self) -> None:
        """Reset JetStream's ack_wait timer for this message (a WPI ack)."""
        if not self._settled:
            with contextlib.suppress(nats.errors.Error):
                await self._raw.in_progress()

    async def nak(self, delay: float | None = None) -> None:
        """Ask JetStream to redeliver, after ``delay`` seconds if given; same rules as ack."""
        if self._settle():
            try:
                await self._raw.nak(delay=delay if delay and delay > 0 else None)
            except nats.errors.Error as exc:
                raise _translate(exc, "nak") from exc


_RECONNECT_SAY_EVERY = 60.0  # seconds between warnings while reconnects keep failing

UNANSWERED_GAP = 30.0
"""Seconds between two unacknowledged publishes (none acknowledged between them) past which
they are two runs, not one (:meth:`NatsBus.unanswered`)."""


class NatsBus:
    """The :class:`~eventbus.bus.Bus` on JetStream; use as ``async with NatsBus(cfg) as bus``."""

    def __init__(self, config: NatsBusConfig) -> None:
        self.config = config
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._closing = False
        self._unsettled: set[_NatsMessage] = set()
        self._behind: list[tuple[Behind, InFlightWindow]] = []  # one per consuming iterator
        self.stall_after = STALL_AFTER
        self.publish_stall_after = PUBLISHES_STALL_AFTER
        # Per iterator: fetched but not yet handed out (handed back on close).
        self._batches: list[deque[Msg]] = []
        self._pulls: set[JetStreamContext.PullSubscription] = set()
        self._violation: tuple[float, str] | None = None
        self._acks = _Acks()
        self._publishes = FailureRun()  # publishes the server could not take, in a row
        self._unanswered = FailureRun()  # publishes sent whose acknowledgement never came
        self._reconnect_reason = ""  # why the last reconnect failed, while not connected
        self._reconnect_said = ("", 0.0)  # the reason last logged, and when
        self._reconnect_told = -math.inf  # when a reconnect was last refused (not just reset)

    async def __aenter__(self) -> Self:
        """Connect and make sure the stream exists.

        Raises BusUnavailable when the server cannot be reached within ``connect_timeout``,
        BusError when it refuses the credentials or the stream cannot be created, ConfigError
        when a TLS or creds file cannot be read.
        """
        cfg = self.config
        auth = {} if cfg.auth is None else cfg.auth.nats_options(f"NATS bus {redact_url(cfg.url)}")
        nc = Client()
        attempts: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            # Until connected, the failed attempts explain a timeout (a refused password);
            # afterwards, errors are the open connection's, or its reconnects' (they were
            # kept in that list, one a second for as long as a reconnect failed, unsaid).
            if nc.is_connected:
                await self._on_error(exc)
            elif self._nc is nc:
                self._reconnect_failed(exc)
            else:
                attempts.append(exc)

        if (cfg.auth or NatsAuth()).wants_tls(cfg.url):
            try:
                await refuse_nats_plaintext(cfg.url, f"NATS bus {redact_url(cfg.url)}")
            except PermissionError as exc:
                raise BusError(str(exc)) from None
        try:
            # Reconnects are unlimited once connected; the first connect gets connect_timeout.
            async with asyncio.timeout(cfg.connect_timeout):
                await nc.connect(
                    cfg.url,
                    connect_timeout=math.ceil(cfg.connect_timeout),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=_RECONNECT_WAIT,
                    error_cb=on_error,
                    **auth,
                )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            # close() asserts that connect() got as far as a transport; else nothing is open.
            with contextlib.suppress(AssertionError):
                await nc.close()
            # A refused password, else a failed TLS handshake (a certificate from another CA,
            # a host name not in it): the attempts say why; the timeout alone said nothing.
            refused = [e for e in attempts if _refused(e)]
            handshakes = [e for e in attempts if isinstance(e, ssl.SSLError)]
            cause = (refused or handshakes or [exc])[-1]
            raise _translate(cause, f"connect to {redact_url(cfg.url)}") from exc
        self._nc = nc
        self._js = self._nc.jetstream(timeout=cfg.publish_timeout)
        try:
            await self._acks.open(nc)
        except (nats.errors.Error, OSError) as exc:
            await nc.close()
            raise _translate(exc, "subscribe to the publish acknowledgements") from exc
        needed = bus_message_limit(cfg.max_event_size)
        if nc.max_payload < needed:
            log.warning(
                "the NATS server's max_payload (%d bytes) is below what an event of "
                "max_event_size (%d bytes) may take on the bus (%d): larger ones are refused "
                "(413); raise max_payload on the server or lower max_event_size",
                nc.max_payload,
                cfg.max_event_size,
                needed,
            )
        try:
            await self._ensure_stream(self._js)
        except BaseException:
            await self._nc.close()
            raise
        return self

    def _reconnect_failed(self, exc: Exception) -> None:
        """A reconnect failed (a password changed, a certificate expired, the server down):
        the reason is what ``publish`` says while not connected (a refusal rather than the
        connection reset that follows it), and a warning at once, then once a minute."""
        now = time.monotonic()
        telling = _refused(exc) or isinstance(exc, ssl.SSLError)
        if not telling and now - self._reconnect_told < _RECONNECT_WAIT * 5:
            # the connection reset that follows a refusal says less than the refusal
            return
        if telling:
            self._reconnect_told = now
        reason = str(_translate(exc, "reconnect"))
        self._reconnect_reason = reason
        said, at = self._reconnect_said
        if not said or now - at >= _RECONNECT_SAY_EVERY:
            self._reconnect_said = (reason, now)
            log.warning("%s (trying again)", reason)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS connection to %s: %r", redact_url(self.config.url), exc)
        if "permissions violation" in str(exc).lower():
            self._violation = (time.monotonic(), str(exc))

    def _violation_since(self, moment: float) -> str | None:
        """The server's last "Permissions Violation" since ``moment``, if any. The server
        answers a request its user may not make with that error on the connection, not on the
        request, which then times out."""
        if self._violation is not None and self._violation[0] >= moment:
            return self._violation[1]
        return None

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        cfg = self.config
        stream = StreamConfig(
            name=cfg.stream,
            subjects=[cfg.subject],
            storage=StorageType.FILE,
            duplicate_window=cfg.duplicate_window,
            max_age=cfg.max_age,
            num_replicas=cfg.replicas,
        )
        try:
            await js.add_stream(stream)
        except nats.js.errors.BadRequestError as exc:
            # Another process (or an operator) made the stream with other settings: use it as is.
            if exc.err_code != _STREAM_EXISTS_DIFFERENT:
                raise _translate(exc, f"create stream {cfg.stream}") from exc
            log.warning("stream %s exists with different settings; using it as is", cfg.stream)
            try:
                existing = (await js.stream_info(cfg.stream)).config
            except nats.errors.Error as exc:
                raise _translate(exc, f"read stream {cfg.stream}") from exc
            _refuse_dropping(existing)
        except nats.errors.Error as exc:
            raise _translate(exc, f"create stream {cfg.stream}") from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Hand every un-settled message back for immediate redelivery, flush, and disconnect."""
        self._closing = True
        nc, self._nc, self._js = self._nc, None, None
        if nc is None:
            return
        for msg in list(self._unsettled):
            with contextlib.suppress(BusError):
                await msg.nak()
        for batch in self._batches:
            await _hand_back(batch)
        for psub in list(self._pulls):
            await _hand_back_late(psub)
        # Not drain(): it waits for every pull subscription's queue to empty, which a consumer
        # that stopped iterating never does. Flushing is enough to get acks and naks out.
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await nc.flush(timeout=max(1, round(self.config.connect_timeout)))
        # With the server already gone, nats-py may write to a closed transport while closing
        # (uvloop raises RuntimeError for that): there is nothing left to flush.
        with contextlib.suppress(nats.errors.Error, OSError, RuntimeError):
            await nc.close()

    def _jetstream(self) -> JetStreamContext:
        self._client()
        assert self._js is not None
        return self._js

    def _client(self) -> Client:
        if self._js is None or self._nc is None:
            raise BusError("the bus is not open: use it inside `async with`")
        if not self._nc.is_connected:
            why = f": {self._reconnect_reason}" if self._reconnect_reason else ""
            raise BusUnavailable(f"NATS at {redact_url(self.config.url)} is not connected{why}")
        if self._reconnect_reason:  # connected again: a next failing run is said at once
            self._reconnect_reason = ""
            self._reconnect_said = ("", 0.0)
        return self._nc

    async def publish(
        self, event: dict[str, Any], *, via: str = DIRECT, scope: str | None = None
    ) -> bool:
        """Store ``event`` in the stream and return once JetStream acked it: True when it
        dropped the event as a duplicate (see ``publish_many``).

        Raises BusUnavailable when NATS is not connected or does not ack within
        ``publish_timeout`` (the event may still be stored: republishing is safe inside the
        duplicate window), BusError when the event cannot be encoded or JetStream rejects it.
        ``scope`` (if any) is part of the de-duplication id.
        """
        (result,) = await self.publish_many([event], via=via, scope=scope)
        if isinstance(result, BaseException):
            raise result
        return result == DUPLICATE

    async def publish_many(
        self, events: Sequence[dict[str, Any]], *, via: str = DIRECT, scope: str | None = None
    ) -> list[PublishOutcome]:
        """Publish all events pipelined (async publish, then wait for the acks together).

        Returns one outcome per event, in order: None when stored, DUPLICATE when JetStream
        dropped it as a repeat of a source+id stored within ``duplicate_window``, else the
        BusError or BusUnavailable that ``publish`` would have raised. Never raises for a
        single event.
        """
        cfg = self.config
        results: list[PublishOutcome] = [None] * len(events)
        pending: dict[asyncio.Future[Any], int] = {}
        deadline = asyncio.get_running_loop().time() + cfg.publish_timeout
        try:
            for i, event in enumerate(events):
                try:
                    payload, key = wire_encode(event)
                    if scope is not None:
                        key = f"{key}/{scope}"
                    nc = self._client()
                    reply, future = self._acks.expect()
                    try:
                        # a publish waits when the client's buffer is full: one deadline bounds
                        # the loop, entered for each publish (nats-py's forced flush swallows a
                        # cancellation: one timeout over the batch was lost there, and the next
                        # publish waited for as long as the server stayed frozen)
                        async with asyncio.timeout_at(deadline):
                            await nc.publish(
                                cfg.subject,
                                payload,
                                reply=reply,
                                headers={"Nats-Msg-Id": key, _VIA: via},
                            )
                    except BaseException:
                        future.cancel()
                        raise
                except BusError as exc:
                    results[i] = exc
                except nats.errors.MaxPayloadError:
                    results[i] = EventTooLargeForBus(
                        f"the event takes {len(payload)} bytes on the bus, more than the NATS "
                        f"server's max_payload ({self._nc.max_payload if self._nc else '?'} bytes)"
                    )
                except (nats.errors.Error, OSError, TimeoutError) as exc:
                    stop_if_cancelled()  # this task's own cancellation must not become a result
                    results[i] = _translate(exc, "publish")
                else:
                    pending[future] = i
            unanswered: list[BaseException] = []

            def translate(exc: BaseException) -> BusError:
                if isinstance(exc, TimeoutError):
                    unanswered.append(exc)
                return _translate(exc, "publish")

            await collect_acks(
                pending,
                results,
                cfg.publish_timeout,
                translate,
                duplicate=lambda ack: bool(ack.duplicate),
            )
            if any(result is None or result is DUPLICATE for result in results):
                self._unanswered.ended()
            elif unanswered:
                # Timeouts further apart than UNANSWERED_GAP (two short stalls with nothing
                # published between them) are not one run: a run held the first one's time,
                # and a healthy server was restarted as stuck after two 5 s freezes half a
                # minute apart. Closer ones are (a sparse sender's publishes, 12 s apart).
                apart = time.monotonic() - self._unanswered.at > UNANSWERED_GAP
                self._unanswered.failed(unanswered[0], new=apart)
        except BaseException:
            # cancelled (or worse): the acknowledgements no one waits for leave the inbox's
            # table now, not when an answer comes (a server gone, never)
            for future in pending:
                future.cancel()
            raise
        note_publishes(self._publishes, results, self.publish_stall_after)
        return results

    async def _align_consumer(self, js: JetStreamContext) -> None:
        """Give an existing durable consumer the configured ``ack_wait`` and ``max_deliver``
        (``pull_subscribe`` takes it as it is). The router's keep-alive is timed from the
        configured ``ack_wait``: a consumer left with an older, shorter one gave the work of a
        slow function to another pull again and again (4 deliveries of one event in a test)."""
        cfg = self.config
        try:
            current = (await js.consumer_info(cfg.stream, cfg.durable)).config
        except nats.js.errors.NotFoundError:
            return  # made below as configured (or its stream is gone: handled there)
        if current.ack_wait == cfg.ack_wait and current.max_deliver == cfg.max_deliver:
            return
        log.info(
            "consumer %s: ack_wait %ss -> %ss, max_deliver %s -> %s, as configured",
            cfg.durable,
            current.ack_wait,
            cfg.ack_wait,
            current.max_deliver,
            cfg.max_deliver,
        )
        changed = dataclasses.replace(current, ack_wait=cfg.ack_wait, max_deliver=cfg.max_deliver)
        await js.add_consumer(cfg.stream, config=changed)

    async def messages(self) -> AsyncIterator[BusMessage]:
        """Pull events from the shared durable consumer until the bus closes.

        At most ``max_in_flight`` yielded messages are un-settled at any time: the iterator
        waits for an ack/nak before pulling more. A payload that is not a valid CloudEvent is
        handed out too, marked ``rejected``, for the consumer to set aside. While the server is
        unreachable the iterator keeps polling and resumes on reconnect. Raises BusUnavailable
        or BusError when the consumer cannot be created.
        """
        cfg = self.config
        js = self._jetstream()
        consumer = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=cfg.ack_wait,
            max_deliver=cfg.max_deliver,
            # The bound is per process (max_in_flight); a server-side one would cap the cluster.
            max_ack_pending=-1,
        )

        def subscribe() -> Awaitable[JetStreamContext.PullSubscription]:
            return js.pull_subscribe(
                cfg.subject, durable=cfg.durable, stream=cfg.stream, config=consumer
            )

        asked = time.monotonic()
        try:
            try:
                await self._align_consumer(js)
                psub = await subscribe()
            except nats.js.errors.NotFoundError:
                # The stream was deleted under the running service (an operator remaking it):
                # make it again as it opened, then the consumer.
                log.warning("stream %s is gone; making it again", cfg.stream)
                await self._ensure_stream(js)
                psub = await subscribe()
        except nats.errors.Error as exc:
            refused = self._violation_since(asked)
            if refused is not None:  # no waiting will help: the user may not do this
                raise BusError(
                    f"NATS create consumer {cfg.durable} failed: the server refused it: {refused}"
                ) from exc
            raise _translate(exc, f"create consumer {cfg.durable}") from exc
        window = InFlightWindow(cfg.max_in_flight)
        behind = Behind()
        watched = (behind, window)
        self._behind.append(watched)
        batch: deque[Msg] = deque()
        self._batches.append(batch)
        self._pulls.add(psub)
        try:
            while not self._closing:
                stop_if_cancelled()  # nats-py's fetch may lose a cancellation (3.11)
                if not batch:
                    # Messages that arrived late for an earlier pull wait in the subscription
                    # and come with the next fetch whatever it asks for: they count as held.
                    free = window.free
                    if free <= 0:
                        await window.wait(cfg.fetch_timeout)
                        continue
                    want = min(free - psub.pending_msgs, cfg.fetch_batch)
                    await self._fetch(psub, max(1, want), batch)
                    stale = behind.idle(window) > self.stall_after / 2
                    if not batch and behind.waiting > 0 and stale:
                        # Shared by every instance: others may have taken what was waiting.
                        await self._still_waiting(behind)
                    # Never hold more than the window: hand back whatever does not fit.
                    excess: deque[Msg] = deque()
                    while len(batch) > free:
                        excess.appendleft(batch.pop())
                    await _hand_back(excess)
                    continue
                raw = batch.popleft()
                try:
                    msg = _NatsMessage(raw, window, self)
                except nats.errors.NotJSMessageError:
                    # Not from JetStream: anyone allowed to publish to the pull's inbox can put
                    # a plain message there. Nothing to settle; it raised out of the iterator.
                    log.warning("dropped a message on the pull inbox that JetStream did not send")
                    continue
                window.take()
                self._unsettled.add(msg)
                behind.received(raw.metadata.num_pending or 0)
                yield msg
        finally:
            self._behind.remove(watched)
            self._batches.remove(batch)
            self._pulls.discard(psub)
            if not self._closing:  # (closing, the bus did this while it could)
                await _hand_back_late(psub)
            # Unsubscribed first: a pull of this subscription still waiting on the server
            # (lingering, say) could otherwise be given the messages handed back, which the
            # unsubscribed inbox then drops (they wait out ack_wait).
            with contextlib.suppress(nats.errors.Error):
                await psub.unsubscribe()
            await _hand_back(batch)

    async def _still_waiting(self, behind: Behind) -> None:
        """Ask the server how many events wait for the consumer now (no answer: as before)."""
        with contextlib.suppress(nats.errors.Error, TimeoutError, BusError):
            info = await self._jetstream().consumer_info(self.config.stream, self.config.durable)
            behind.waiting = info.num_pending or 0

    async def _fetch(
        self, psub: JetStreamContext.PullSubscription, n: int, into: deque[Msg]
    ) -> None:
        """Pull up to ``n`` messages into ``into`` (there as they come: if the pull is
        cancelled halfway, the iterator hands back what it holds)."""
        # A pull for n messages that has to wait returns only when n arrived or it expired, so
        # a trickle of events would sit in a half-filled batch for the whole fetch_timeout.
        # Long-poll for the first message alone, then take whatever else is there within
        # fetch_linger: latency stays at milliseconds, batches stay full under load.
        try:
            into.extend(await psub.fetch(1, timeout=self.config.fetch_timeout))
        except TimeoutError:
            return
        except nats.errors.Error as exc:
            await self._fetch_failed(exc)
            return
        if n > 1:
            # hand out what came; a lasting error meets the next pull again
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                into.extend(await psub.fetch(n - 1, timeout=self.config.fetch_linger))

    async def _fetch_failed(self, exc: nats.errors.Error) -> None:
        """Wait out a pull that failed for an outage; raise for anything else."""
        if self._closing:
            return
        error = _translate(exc, "fetch")
        if not isinstance(error, BusUnavailable):
            raise error from exc
        if await self._consumer_gone():
            # Deleted under the running service (with its stream, perhaps): every pull answers
            # 503 for ever while the server is fine. A new iterator makes it again.
            raise BusError(
                f"the JetStream consumer {self.config.durable} of stream "
                f"{self.config.stream} is gone"
            ) from exc
        log.warning("%s; retrying", error)
        await asyncio.sleep(self.config.fetch_timeout)

    async def _consumer_gone(self) -> bool:
        """True when the server, connected, says the durable consumer (or its stream) does not
        exist; False when it exists or nothing can be said."""
        try:
            await self._jetstream().consumer_info(self.config.stream, self.config.durable)
        except nats.js.errors.NotFoundError:
            return True
        except (nats.errors.Error, TimeoutError, BusError):  # BusError: closed, disconnected
            return False
        return False

    def stalled(self) -> str | None:
        """Why the consumer makes no progress though the server answers: it has room, the
        server said events wait for it, and none has come for ``STALL_AFTER`` s (a consumer
        paused on the server, say); or publishes failing though it answers (its store unable
        to write: see ``publishes_failing``). Acknowledgements fail as its requests do, which
        the router's own health reports."""
        failing = publishes_failing(self._publishes, self.publish_stall_after)
        if failing is not None:
            return failing
        for behind, window in self._behind:
            why = behind.stalled(window, self.stall_after)
            if why is not None:
                return why
        return None

    def unanswered(self, after: float) -> str | None:
        """Why the server looks stuck, or None: publishes sent to it have had no
        acknowledgement for ``after`` s, none stored since, the last within as long (a
        nats-server whose store hit a full disk answers everything else and stores nothing
        again, the space freed or not, until it is restarted)."""
        lasted = self._unanswered.still_longer_than(after)
        if lasted is None:
            return None
        return f"no publish acknowledged for {lasted:.0f} s: {self._unanswered.last}"

    def forget_unanswered(self) -> None:
        """Forget the publishes gone unanswered so far: the server did not answer a request
        either (frozen, unreachable), so they say nothing of its store. A run counts again
        from the next one."""
        self._unanswered.ended()

    async def ping(self) -> bool:
        """True when the server answers a JetStream account request right now."""
        try:
            await self._jetstream().account_info()
        except (nats.errors.Error, BusError, TimeoutError):
            return False
        return True
