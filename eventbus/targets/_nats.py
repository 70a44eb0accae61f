"""The NATS subject target: publishes one message per delivery with nats-py.

Place in the pipeline: last hop of the router, a twin of the Kafka target. ``deliver`` turns a
routed payload into a message (CloudEvents NATS binding, or a plain JSON/text payload carrying
the original event's identity in ``ce-`` headers), publishes it and reports the attempt as an
``Outcome``:

* core NATS has no acknowledgement: the target flushes (a PING/PONG round trip), so "delivered"
  means the server received the message, not that a subscriber did; with no subscriber the
  server drops it;
* JetStream waits for the stream's publish acknowledgement, so "delivered" means stored. With no
  stream capturing the subject the server answers "no responders": that outcome is retryable,
  because a stream may be created later, and its error says what is missing.

A server that is down must not stop the service from starting, so the connection is made in the
background when the target opens, and again by the first delivery that finds it closed; until
then deliveries fail as retryable outcomes. The client does not reconnect by itself (a message
buffered during a reconnect would be sent after its attempt already failed). Only
``_outcome_from_error`` knows nats-py's exception types: nothing from nats-py escapes ``deliver``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import ssl
import weakref
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import Field

from eventbus._errors import CloudEventError, ConfigError
from eventbus.cloudevents import to_nats
from eventbus.config import Duration, NatsAuth, TargetSpec, redact_url, refuse_nats_plaintext
from eventbus.targets._base import (
    Answer,
    Outcome,
    failure,
    retryable_status,
    send_once,
    trace_attempt,
    truncate_error,
)
from eventbus.targets._lazy import LazyClient

__all__ = ["NatsTarget", "NatsTargetSpec"]

log = logging.getLogger(__name__)

_IDENTITY = ("specversion", "id", "source", "type")
_SUBJECT = re.compile(r"^[^.*>\s]+(\.[^.*>\s]+)*$")
_SCHEMES = ("nats", "tls", "ws", "wss")
_RETRY_WAIT = 0.1
"""Seconds between the two connection attempts one connect makes (nats-py makes at least two)."""

T = TypeVar("T")


class NatsTargetSpec(TargetSpec, NatsAuth):
    """``type: nats``: one NATS subject.

    ``url`` is one server URL or several, comma-separated (``nats://``, ``tls://``, ``ws://``,
    ``wss://``). ``jetstream`` waits for a stream's publish acknowledgement instead of a core
    publish. ``mode`` picks the NATS binding's content mode for CloudEvent payloads.
    ``timeout`` bounds one attempt in seconds, including connecting when not connected.
    ``user``/``password``, ``token``, ``nkey_seed``, ``creds`` and ``tls`` authenticate the
    connection (:class:`eventbus.config.NatsAuth`).
    """

    url: str
    subject: str
    jetstream: bool = False
    mode: Literal["binary", "structured"] = "structured"
    timeout: Duration = Field(5.0, gt=0, le=300)


class _PublishRefused(Exception):
    """The server refused a publish (its permissions): it says so only with an -ERR on the
    connection, never in answer to the publish itself."""


class _TooLarge(Exception):
    """The message is over the server's ``max_payload``. nats-py checks the body alone; the
    server counts the headers too, and it answers a larger message by closing the connection
    (every publish in flight on it lost): a retry would close it again."""


def _check_size(nc: Client, headers: dict[str, str] | None, body: bytes) -> None:
    """Raise :class:`_TooLarge` unless headers and body fit the server's ``max_payload``."""
    size = len(body)
    header_size = 0
    if headers:
        # as nats-py writes them: "NATS/1.0\r\n", "key: value\r\n" each, "\r\n"
        header_size = 12 + sum(
            len(k.strip().encode()) + len(v.strip().encode()) + 4 for k, v in headers.items()
        )
    if size + header_size > nc.max_payload:
        headed = f" with {header_size} bytes of headers" if header_size else ""
        raise _TooLarge(
            f"message of {size} bytes{headed} larger than the server's max_payload "
            f"({nc.max_payload} bytes)"
        )


_SEND_ERRORS = (nats.errors.Error, OSError, TimeoutError, _PublishRefused, _TooLarge)
"""What a publish or a request may raise; ``_outcome_from_error`` reads each."""


class _Refusals:
    """The publish permission violations one connection's server reported: how many, the
    last one's text, and an event set by the next one. A target's connection publishes to its
    one subject only, so a refusal on it is a refusal of every publish on it."""

    __slots__ = ("count", "next", "why")

    def __init__(self) -> None:
        self.count = 0
        self.why = ""
        self.next = asyncio.Event()

    def add(self, why: str) -> None:
        self.count += 1
        self.why = why
        self.next.set()
        self.next = asyncio.Event()


_SERVICE_ERROR = "Nats-Service-Error"
_SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
"""The headers of a NATS micro service's error reply: its description and code."""


def _error_reply(reply: Msg, headers: dict[str, str], duration_ms: float) -> Answer:
    """A reply that says the request failed (a NATS micro service's error headers): a failed
    attempt with the error's code as its status (an HTTP one, 400-599, else 500), answered
    as an HTTP function's error is, its data as the body (the description when it has none)."""
    code = headers.get(_SERVICE_ERROR_CODE, "").strip()
    # three ASCII digits, not any str.isdigit() text ("²" passed it, and int() raised)
    http = len(code) == 3 and code.isascii() and code.isdigit() and 400 <= int(code) <= 599
    status = int(code) if http else 500
    why = headers.get(_SERVICE_ERROR, "").strip() or "no description"
    outcome = Outcome(
        delivered=False,
        status=status,
        duration_ms=duration_ms,
        error=truncate_error(f"the service replied with error {code[:20] or '(no code)'}: {why}"),
        retryable=retryable_status(status),
        retry_after=None,
    )
    if reply.data:
        return Answer(outcome, headers.get("Content-Type"), reply.data)
    return Answer(outcome, "text/plain; charset=utf-8", why.encode())


def _outcome_from_error(
    exc: BaseException, duration_ms: float, config: NatsTargetSpec, handshake: str | None = None
) -> Outcome:
    """Translate a nats-py/socket failure into an ``Outcome``: the only place that knows them.
    ``handshake``: why the last TLS handshake of a connect under way failed, if one did."""
    if isinstance(exc, _PublishRefused):
        # Fails the same way until an operator grants it: dead-letter (replayable).
        return failure(f"the server refused the publish: {exc}", duration_ms, retryable=False)
    if isinstance(exc, TimeoutError):
        # nats-py retries a failed handshake until the deadline: without its reason the
        # outcome was a bare timeout (a certificate from another CA, a host name not in it)
        why = "" if handshake is None else f" (connecting: TLS handshake failed: {handshake})"
        return failure(
            f"timeout after {config.timeout:g}s{why}", duration_ms, retryable=True, timed_out=True
        )
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return failure(
            f"no JetStream stream captures subject {config.subject!r} (no responders); create one",
            duration_ms,
            retryable=True,
        )
    if isinstance(exc, nats.errors.NoRespondersError):
        return failure(
            f"nobody answers requests on subject {config.subject!r} (no responders)",
            duration_ms,
            retryable=True,
        )
    if isinstance(exc, nats.js.errors.APIError):
        # 400 is the stream refusing this message (too large, wrong headers): a retry meets the
        # same answer. Anything else (503 storage unavailable, 500) may pass later.
        return failure(
            f"JetStream rejected the message: {exc.description} "
            f"(code {exc.code}, err_code {exc.err_code})",
            duration_ms,
            retryable=exc.code != 400,
        )
    if isinstance(exc, _TooLarge):
        return failure(str(exc), duration_ms, retryable=False)
    if isinstance(exc, nats.errors.MaxPayloadError):
        return failure("message larger than the server's max_payload", duration_ms, retryable=False)
    if isinstance(exc, nats.errors.AuthorizationError) or (
        # nats-py raises the server's -ERR at connect as a plain Error carrying its text.
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    ):
        # Fails the same way until an operator fixes the credentials: dead-letter (replayable).
        return failure(f"NATS authorization failed: {exc}", duration_ms, retryable=False)
    if isinstance(exc, PermissionError):  # refuse_nats_plaintext: fails so until fixed
        return failure(str(exc), duration_ms, retryable=False)
    if isinstance(exc, nats.errors.BadSubjectError | nats.errors.BadHeaderError):
        return failure(f"NATS refused the message: {exc!r}", duration_ms, retryable=False)
    if isinstance(
        exc,
        OSError
        | nats.errors.NoServersError
        | nats.errors.ConnectionClosedError
        | nats.errors.StaleConnectionError,
    ):
        return failure(
            f"cannot reach NATS at {redact_url(config.url)}: {exc}", duration_ms, retryable=True
        )
    return failure(f"{type(exc).__name__}: {exc}", duration_ms, retryable=True)


def _forget(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _message_id(target: str, subject: str, event: dict[str, Any], payload: Any) -> str:
    """One delivery's JetStream message id: the target, its subject, the event's source and
    id, and the payload sent. A stream drops repeats by id whatever the subject: two targets
    whose subjects one stream captures sent the same event as one id, and the second was
    acknowledged as a duplicate and never stored. Two rules' transforms of one event are two
    messages; a retry is the same one. The payload counts with its objects' keys sorted: a
    retry's comes back from the database's jsonb, which orders them its own way (the bytes
    differed, and every retried event was stored twice)."""
    identity = [target, subject, event.get("source"), event.get("id"), payload]
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()


class NatsTarget:
    """Publishes events to one NATS subject; use as ``async with NatsTarget(config) as target``.

    One connection per target, shared by concurrent deliveries. A message whose acknowledgement
    was lost may arrive twice: consumers can deduplicate on the ``ce-id`` header (or the ``id``
    of a structured event).
    """

    def __init__(self, config: NatsTargetSpec) -> None:
        """Raises ``ConfigError`` if the URL or subject is invalid, or a TLS or creds file
        cannot be read."""
        where = f"NATS target {config.name!r}"
        servers = [s.strip() for s in config.url.split(",")]
        for server in servers:
            try:
                parts = urlsplit(server)
                # .port raises ValueError for a port out of range or not a number.
                host, _port = parts.hostname, parts.port
            except ValueError as exc:
                raise ConfigError(f"{where}: invalid url {redact_url(server)!r}: {exc}") from exc
            if parts.scheme not in _SCHEMES or not host:
                raise ConfigError(
                    f"{where}: url must be nats://host:port (or tls://, ws://, wss://), "
                    f"comma-separated for several servers: {redact_url(config.url)!r}"
                )
        if not _SUBJECT.match(config.subject):
            raise ConfigError(
                f"{where}: subject must be dot-separated tokens without spaces or wildcards "
                f"(* >): {config.subject!r}"
            )
        self.name = config.name
        self.config = config
        self._servers = servers
        self._auth = config.nats_options(where)
        self._structured = config.mode == "structured"
        self._nc = LazyClient(
            self._connect,
            owner=f"NATS target {self.name!r}",
            usable=lambda nc: nc.is_connected,
            log=log,
            failed=f"NATS target {self.name}: cannot connect to {redact_url(config.url)}",
            task_name=f"nats-target-connect-{self.name}",
        )
        self._retiring: set[asyncio.Task[None]] = set()
        # set when a connection is closed (its server lost: it does not reconnect)
        self._lost: weakref.WeakKeyDictionary[Client, asyncio.Event] = weakref.WeakKeyDictionary()
        # the publish permission violations each connection's server reported
        self._refused: weakref.WeakKeyDictionary[Client, _Refusals] = weakref.WeakKeyDictionary()
        # why the last TLS handshake of the connect under way failed (None once connected)
        self._handshake: str | None = None

    async def __aenter__(self) -> Self:
        """Begin connecting in the background and return at once.

        A server that cannot be reached is logged, not raised: deliveries retry the connection
        and fail as retryable outcomes meanwhile. Raises ``RuntimeError`` if already open.
        """
        self._nc.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop a pending connect, then flush and close the connection (errors are logged)."""
        nc = await self._nc.close()
        await asyncio.gather(*self._retiring)
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except (nats.errors.Error, OSError) as exc:
                log.warning("NATS target %s: closing the connection failed: %r", self.name, exc)

    def _retire(self, nc: Client) -> None:
        task = asyncio.create_task(self._close_quietly(nc), name=f"close {self.name} connection")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_quietly(self, nc: Client) -> None:
        # (TimeoutError, from the deadline, is an OSError; nats-py's close asserts that a
        # connect got as far as a transport)
        quiet = (nats.errors.Error, OSError, RuntimeError, AssertionError, asyncio.CancelledError)
        with contextlib.suppress(*quiet):
            async with asyncio.timeout(self.config.timeout):
                await nc.close()

    async def _connect(self) -> Client:
        nc = Client()
        attempts: list[Exception] = []
        lost = self._lost[nc] = asyncio.Event()
        refusals = self._refused[nc] = _Refusals()

        async def on_closed() -> None:
            lost.set()

        async def on_error(exc: Exception) -> None:
            # Failed attempts of this connect are reported through its outcome. Later errors
            # happen on the open connection: a lost server, or a publish permissions violation
            # (core NATS reports those only asynchronously, so no delivery can see them).
            if nc.is_connected:
                log.warning("NATS target %s: %r", self.name, exc)
                if "permissions violation for publish" in str(exc).lower():
                    refusals.add(str(exc))
            else:
                attempts.append(exc)
                if isinstance(exc, ssl.SSLError):
                    self._handshake = str(exc)

        if self.config.wants_tls(self._servers):
            await refuse_nats_plaintext(self._servers, f"NATS target {self.name}")
        try:
            async with asyncio.timeout(self.config.timeout):
                await nc.connect(
                    self._servers,
                    name=f"eventbus target {self.name}",
                    connect_timeout=math.ceil(self.config.timeout),
                    allow_reconnect=False,
                    # At least one: nats-py retries an initial connect forever when it is <= 0.
                    max_reconnect_attempts=1,
                    reconnect_time_wait=_RETRY_WAIT,  # type: ignore[arg-type]
                    error_cb=on_error,
                    closed_cb=on_closed,
                    **self._auth,
                )
        except BaseException as exc:
            # Closed aside, bounded: after a failed TLS handshake the close waited for ever
            # (the transport never closed), and every later delivery joined this connect
            # and timed out, the server fixed or not.
            self._retire(nc)
            handshakes = [e for e in attempts if isinstance(e, ssl.SSLError)]
            if isinstance(exc, TimeoutError) and handshakes:
                # the timeout ran out while nats-py kept trying: a failed TLS handshake (a
                # certificate from another CA, a host name not in it) is why
                raise handshakes[-1] from exc
            if isinstance(exc, nats.errors.NoServersError) and attempts:
                # NoServersError says nothing; the last attempt's error says why (refused...).
                raise attempts[-1] from exc
            raise
        self._handshake = None
        return nc

    async def _unless_lost(self, nc: Client, step: Awaitable[T], *, refusable: bool = False) -> T:
        """``step`` on ``nc``; ConnectionClosedError as soon as ``nc`` closes and, if
        ``refusable`` (a request: a JetStream publish is one), _PublishRefused as soon as its
        server refuses a publish. nats-py leaves a request, a JetStream publish or a flush
        waiting for its answer until the timeout in either case (reported as a retryable
        timeout: a JetStream publish the user may not make was retried for a day, then
        dead-lettered as timed out). A flush is not ``refusable``: its answer follows the
        refusal, and a flush cut short leaves a PONG that breaks the connection's reader."""
        lost = self._lost.get(nc)
        refusals = self._refused.get(nc)
        if lost is None or refusals is None:
            return await step
        work = asyncio.ensure_future(step)
        closed = asyncio.ensure_future(lost.wait())
        refused = asyncio.ensure_future(refusals.next.wait()) if refusable else None
        watched = (work, closed) if refused is None else (work, closed, refused)
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if refused is not None:
                refused.cancel()
            if not work.done():
                work.cancel()  # its failure, if any, is not this attempt's outcome
                work.add_done_callback(_forget)
        if work.done():
            return work.result()
        if refused is not None and refused.done() and not refused.cancelled():
            raise _PublishRefused(refusals.why)
        raise nats.errors.ConnectionClosedError

    def _message(
        self, event: dict[str, Any], payload: Any, is_cloudevent: bool
    ) -> tuple[dict[str, str], bytes]:
        if is_cloudevent:
            return to_nats(payload, structured=self._structured)
        # A transform's output is not a CloudEvent, but the consumer still gets the original
        # event's identity so it can deduplicate redeliveries.
        headers, _ = to_nats({name: event[name] for name in _IDENTITY}, structured=False)
        if isinstance(payload, str):
            headers["Content-Type"] = "text/plain; charset=utf-8"
            return headers, payload.encode()
        headers["Content-Type"] = "application/json"
        return headers, orjson.dumps(payload)

    async def deliver(
        self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool, attempt: int
    ) -> Outcome:
        """Publish ``payload`` to the subject once: flushed (core) or acknowledged (JetStream).

        Never raises for a delivery failure (those are ``Outcome`` values, ``status`` None);
        raises ``RuntimeError`` if called outside ``async with``.
        """
        outcome, _ = await self._publish(event, payload, is_cloudevent, attempt)
        return outcome

    async def invoke(self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool) -> Answer:
        """Publish once, as ``deliver`` does; a delivered answer is the acknowledgement as
        JSON: ``{"subject"}`` for core NATS (the server has the message), ``{"subject",
        "stream", "seq", "duplicate"}`` with JetStream."""
        outcome, ack = await self._publish(event, payload, is_cloudevent, 1)
        if not outcome.delivered:
            return Answer(outcome)
        return Answer(outcome, "application/json", orjson.dumps(ack))

    async def request(self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool) -> Answer:
        """Send ``payload`` as a core NATS request to the subject and return the first reply
        within ``timeout``: its data as the body, its ``Content-Type`` header if it has one.
        No subscriber is a retryable failure (no responders). On a subject a JetStream stream
        captures, the stream's acknowledgement is that reply. Never raises for a failure;
        ``RuntimeError`` outside ``async with``."""
        self._nc.check_open()
        try:
            headers, body = self._message(event, payload, is_cloudevent)
        except (CloudEventError, orjson.JSONEncodeError, KeyError) as exc:
            return Answer(failure(f"cannot build the message: {exc}", 0.0, retryable=False))
        cfg = self.config
        replies: list[Msg] = []

        async def send() -> None:
            async with asyncio.timeout(cfg.timeout):
                nc = await self._nc.get()
                _check_size(nc, headers, body)
                replies.append(
                    await self._unless_lost(
                        nc,
                        nc.request(cfg.subject, body, timeout=cfg.timeout, headers=headers),
                        refusable=True,
                    )
                )

        outcome = await send_once(
            send,
            errors=_SEND_ERRORS,
            outcome_from_error=lambda exc, ms: _outcome_from_error(exc, ms, cfg, self._handshake),
        )
        trace_attempt(log, self.name, event.get("id"), 1, outcome)
        if not outcome.delivered:
            return Answer(outcome)
        (reply,) = replies
        headers = reply.headers or {}
        if _SERVICE_ERROR in headers or _SERVICE_ERROR_CODE in headers:
            return _error_reply(reply, headers, outcome.duration_ms)
        return Answer(outcome, headers.get("Content-Type"), reply.data)

    async def _publish(
        self, event: dict[str, Any], payload: Any, is_cloudevent: bool, attempt: int
    ) -> tuple[Outcome, dict[str, Any]]:
        self._nc.check_open()
        try:
            headers, body = self._message(event, payload, is_cloudevent)
        except (CloudEventError, orjson.JSONEncodeError, KeyError) as exc:
            # The payload itself is unsendable: no retry can fix it.
            return failure(f"cannot build the message: {exc}", 0.0, retryable=False), {}
        cfg = self.config
        ack: dict[str, Any] = {"subject": cfg.subject}
        if cfg.jetstream:
            # the server drops a repeat within its stream's duplicate window: each attempt a
            # frozen server had taken before the timeout was stored (460 messages for 300
            # events in a review)
            headers["Nats-Msg-Id"] = _message_id(self.name, cfg.subject, event, payload)

        async def send() -> None:
            nc: Client | None = None
            try:
                async with asyncio.timeout(cfg.timeout):
                    nc = await self._nc.get()
                    _check_size(nc, headers, body)
                    if cfg.jetstream:
                        js = nc.jetstream(timeout=cfg.timeout)
                        stored = await self._unless_lost(
                            nc,
                            js.publish(cfg.subject, body, timeout=cfg.timeout, headers=headers),
                            refusable=True,
                        )
                        ack.update(
                            stream=stored.stream, seq=stored.seq, duplicate=bool(stored.duplicate)
                        )
                    else:
                        refusals = self._refused.get(nc)
                        before = 0 if refusals is None else refusals.count
                        await nc.publish(cfg.subject, body, headers=headers)
                        await self._unless_lost(nc, nc.flush(timeout=math.ceil(cfg.timeout)))
                        # The server answers a refused publish with -ERR before the flush's
                        # PONG: it was reported delivered, and the message was lost.
                        if refusals is not None and refusals.count != before:
                            raise _PublishRefused(refusals.why)
            except TimeoutError:
                if nc is not None and not cfg.jetstream and self._nc.discard(nc):
                    # nats-py keeps the PONG future of a flush that timed out queued, and the
                    # late PONG breaks the connection's reader: the next attempt would time out
                    # too. A new connection for the next attempt; this one is closed aside.
                    self._retire(nc)
                raise

        outcome = await send_once(
            send,
            errors=_SEND_ERRORS,
            outcome_from_error=lambda exc, ms: _outcome_from_error(exc, ms, cfg, self._handshake),
        )
        trace_attempt(log, self.name, event.get("id"), attempt, outcome)
        return outcome, ack
