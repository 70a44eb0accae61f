"""The HTTP function target: delivers one event per POST with aiohttp.

Place in the pipeline: last hop of the router. ``deliver`` turns a routed payload into a request
(CloudEvents HTTP binding, or a plain JSON/text body for a transform's output), signs it
(Standard Webhooks) when the target has a secret, and maps whatever happens into an ``Outcome``:
the status classification that drives retries and dead letters, a server-requested
``Retry-After``, and a CloudEvent reply that the router publishes back onto the bus.

Only ``_outcome_from_error`` knows aiohttp's exception types; every library failure is
translated there, so nothing from aiohttp escapes ``deliver``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import weakref
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp
import orjson
from pydantic import Field, field_validator
from yarl import URL

from eventbus._errors import CloudEventError, ConfigError
from eventbus._oauth import OAuth2Client, TokenError
from eventbus.cloudevents import from_http, to_http
from eventbus.config import Secret, TargetSpec, TlsSpec
from eventbus.targets._base import (
    MAX_ERROR_CHARS,
    Answer,
    Outcome,
    failure,
    trace_attempt,
    truncate_error,
)
from eventbus.targets._http_auth import HttpAuthSpec, auth_header_name, auth_headers
from eventbus.targets._signing import decode_secret, signature, webhook_id

__all__ = ["CONNECTION_LIMIT", "HttpTarget", "HttpTargetSpec", "parse_retry_after"]

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1024 * 1024
"""Response bodies are read up to this size; a larger body is cut off and the connection dropped."""

_IDENTITY = ("specversion", "id", "source", "type")

CONNECTION_LIMIT = 512
"""Requests in flight over all HTTP targets of a process (one shared pool); each target's own
``concurrency`` caps its share. A request waiting for a free connection counts towards its
attempt's timeout."""

KEEPALIVE_SECONDS = 15.0
"""How long an idle connection is kept for reuse: one per endpoint host and port, not per target."""

_CREDENTIAL_HEADER = re.compile(
    r"auth|cookie|key|token|secret|passw|credential|session|signature", re.IGNORECASE
)
"""A header whose name says it carries a credential: written as a literal, it is warned about."""


_ENCODED: dict[tuple[int, bool], tuple[Any, dict[str, str], bytes]] = {}
_ENCODED_KEEP = 32  # payloads in flight at once share; big events are kept at most this many times


def _encoded(payload: dict[str, Any], structured: bool) -> tuple[dict[str, str], bytes]:
    """``to_http(payload)``, remembered for the last few payloads: an event matched by fifty
    rules is one payload object handed to fifty targets (payloads are read-only), and encoding
    its headers each time was a visible share of a fan-out's CPU. The entry holds the payload
    itself, so its ``id`` cannot be reused by another object while remembered."""
    key = (id(payload), structured)
    known = _ENCODED.get(key)
    if known is not None and known[0] is payload:
        return dict(known[1]), known[2]
    headers, body = to_http(payload, structured=structured)
    if len(_ENCODED) >= _ENCODED_KEEP:
        del _ENCODED[next(iter(_ENCODED))]
    _ENCODED[key] = (payload, headers, body)
    return dict(headers), body


class _SharedSession:
    """One aiohttp session for every HTTP target on an event loop: one connection pool and one
    DNS cache, so file descriptors grow with the endpoints in use, not with the targets defined.

    Reference-counted: the first target to open creates it, the last to close closes it.
    """

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SharedSession] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=CONNECTION_LIMIT, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
            ),
            # Uncompressed answers only (every request says Accept-Encoding: identity): a
            # compressed body could expand past the read bound.
            auto_decompress=False,
        )
        self.users = 0

    @classmethod
    def acquire(cls) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        shared = cls._by_loop.get(loop)
        if shared is None or shared.session.closed:
            shared = cls._by_loop[loop] = cls()
        shared.users += 1
        return shared.session

    @classmethod
    async def release(cls, session: aiohttp.ClientSession) -> None:
        shared = cls._by_loop.get(asyncio.get_running_loop())
        if shared is None or shared.session is not session:
            await session.close()  # opened on a loop that has since been replaced
            return
        shared.users -= 1
        if shared.users == 0:
            del cls._by_loop[asyncio.get_running_loop()]
            await session.close()


class HttpTargetSpec(TargetSpec):
    """``type: http``: one function endpoint.

    ``mode`` picks the CloudEvents HTTP binding for CloudEvent payloads; ``timeout`` bounds one
    attempt (connect, send, answer, body) in seconds; ``concurrency`` caps requests in flight to
    this endpoint; ``headers`` are added to every request, each value a secret (a literal is
    warned about only when the header's name says it carries a credential: ``Authorization``,
    ``X-Api-Key``, ``Cookie`` ...); ``auth`` authenticates to the function (Basic, API key,
    bearer, OAuth 2.0: ``_http_auth``); ``tls`` verifies an https endpoint with its own CA,
    server name or client certificate (mutual TLS); ``secret`` (a secret: ``{env: NAME}``,
    ``{file: PATH}`` or literal) turns on Standard Webhooks signing (``whsec_<base64>`` or a
    raw string).
    """

    url: str = Field(pattern=r"^https?://")
    mode: Literal["binary", "structured"] = "binary"
    concurrency: int = Field(16, ge=1, le=1024)
    headers: dict[str, Secret] = {}
    secret: Secret | None = None
    auth: HttpAuthSpec | None = None
    tls: TlsSpec | None = None

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, headers: dict[str, Secret]) -> dict[str, Secret]:
        # Custom headers are often credentials, so every value is a secret (masked wherever
        # the spec is shown), but "X-Team: billing" belongs in the file: no warning for it.
        return {
            name: (
                Secret(value.reveal(), "plain")
                if value.literal and _CREDENTIAL_HEADER.search(name) is None
                else value
            )
            for name, value in headers.items()
        }


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value (delta-seconds or an HTTP-date).

    Returns None when the value is absent or unreadable; a date in the past gives 0.0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _outcome_from_error(exc: Exception, duration_ms: float, timeout: float) -> Outcome:
    """Translate an aiohttp/socket failure into an ``Outcome``: the only place that knows them."""
    if isinstance(exc, TimeoutError):
        return failure(f"timeout after {timeout:g}s", duration_ms, retryable=True, timed_out=True)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        # A rejected certificate fails the same way until an operator fixes it: dead-letter it
        # (replayable) rather than hammer the endpoint for a day.
        return failure(f"TLS certificate rejected: {exc}", duration_ms, retryable=False)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return failure(f"DNS lookup failed for {exc.host}", duration_ms, retryable=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        where = f"{exc.host}:{exc.port}"
        if isinstance(exc.os_error, ConnectionRefusedError):
            return failure(f"connection refused by {where}", duration_ms, retryable=True)
        reason = exc.os_error.strerror or str(exc.os_error)
        return failure(f"cannot connect to {where}: {reason}", duration_ms, retryable=True)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return failure("server disconnected before answering", duration_ms, retryable=True)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return failure(f"malformed response body: {exc}", duration_ms, retryable=True)
    if isinstance(exc, aiohttp.InvalidURL):
        return failure(f"invalid URL: {exc}", duration_ms, retryable=False)
    return failure(f"{type(exc).__name__}: {exc}", duration_ms, retryable=True)


_NO_CONTENT_TYPE = ("Content-Type",)


async def _read_bounded(stream: aiohttp.StreamReader) -> tuple[bytes, bool]:
    """Read at most ``MAX_RESPONSE_BYTES``; the flag says whether the whole body was read."""
    chunks: list[bytes] = []
    size = 0
    # Each pass reads at least one byte or stops, so the loop ends within the bound.
    while size <= MAX_RESPONSE_BYTES:
        chunk = await stream.read(MAX_RESPONSE_BYTES + 1 - size)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:MAX_RESPONSE_BYTES], False


class HttpTarget:
    """Delivers events to one HTTP endpoint; use as ``async with HttpTarget(config) as target``.

    Every HTTP target of the process shares one connection pool (``CONNECTION_LIMIT``
    connections in flight, idle ones kept per endpoint); a semaphore caps this target's requests
    in flight at ``concurrency`` (callers beyond it wait their turn; that wait is not part of the
    per-attempt timeout).
    """

    def __init__(self, config: HttpTargetSpec) -> None:
        """Raises ``ConfigError`` if the URL, headers or secret is invalid, ``auth`` and
        ``headers`` both set the same header, or a TLS file cannot be read."""
        where = f"HTTP target {config.name!r}"
        try:
            url = URL(config.url)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: invalid url {config.url!r}: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"{where}: url must be http(s)://host/...: {config.url!r}")
        auth = {} if config.auth is None else auth_headers(config.auth)
        static = {name: value.reveal() for name, value in config.headers.items()}
        for key, value in {**static, **auth}.items():
            if any(c in key + value for c in "\r\n\0"):
                raise ConfigError(f"{where}: header {key!r} contains a line break or NUL")
        if config.auth is not None:
            name = auth_header_name(config.auth)
            if name.lower() in {k.lower() for k in config.headers}:
                raise ConfigError(f"{where}: header {name!r} is set by both headers and auth")
        if url.scheme == "http" and config.auth is not None:
            log.warning("%s: credentials are sent over plain http to %s", where, url.host)
        if url.scheme == "http" and config.tls is not None:
            raise ConfigError(f"{where}: tls needs an https:// url")
        self.name = config.name
        self.config = config
        self._url = url
        self._structured = config.mode == "structured"
        try:
            self._key = None if config.secret is None else decode_secret(config.secret.reveal())
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        self._static = {
            "User-Agent": "eventbus",
            "Accept-Encoding": "identity",
            "Accept": "*/*",
            **static,
            **auth,
        }
        self._oauth: OAuth2Client | None = None
        if config.auth is not None and config.auth.oauth2 is not None:
            self._oauth = OAuth2Client(config.auth.oauth2, where, config.timeout)
        self._ssl: ssl.SSLContext | bool = True if config.tls is None else config.tls.context(where)
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.concurrency)
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)

    async def __aenter__(self) -> Self:
        """Join the shared connection pool; raises ``RuntimeError`` if already open."""
        if self._session is not None:
            raise RuntimeError(f"HTTP target {self.name!r} is already open")
        self._session = _SharedSession.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await _SharedSession.release(session)

    def _request(
        self, event: dict[str, Any], payload: Any, is_cloudevent: bool
    ) -> tuple[dict[str, str], bytes, str]:
        if is_cloudevent:
            ce_headers, body = _encoded(payload, self._structured)
            msg_id = str(payload["id"])
        else:
            # A transform's output is not a CloudEvent, but the function still gets the
            # original event's identity so it can deduplicate redeliveries.
            ce_headers, _ = to_http({name: event[name] for name in _IDENTITY})
            if isinstance(payload, str):
                body = payload.encode()
                ce_headers["Content-Type"] = "text/plain; charset=utf-8"
            else:
                body = orjson.dumps(payload)
                ce_headers["Content-Type"] = "application/json"
            msg_id = str(event["id"])
        return {**self._static, **ce_headers}, body, msg_id

    async def deliver(
        self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool, attempt: int
    ) -> Outcome:
        """POST ``payload`` to the endpoint once and classify the answer.

        Never raises for a delivery failure (those are ``Outcome`` values); raises
        ``RuntimeError`` if called outside ``async with``.
        """
        answer = await self._post(event, payload, is_cloudevent, attempt, wait=True)
        return answer.outcome

    async def invoke(self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool) -> Answer:
        """POST ``payload`` once, as ``deliver`` does, and return the function's answer too:
        its status (in the outcome), ``Content-Type`` and body. With ``concurrency`` requests
        already in flight, nothing is sent (``busy``). An answer larger than 1 MiB is not
        returned cut off: the outcome is then a failure saying so. Raises ``RuntimeError``
        outside ``async with``."""
        return await self._post(event, payload, is_cloudevent, 1, wait=False)

    async def _post(
        self, event: dict[str, Any], payload: Any, is_cloudevent: bool, attempt: int, *, wait: bool
    ) -> Answer:
        session = self._session
        if session is None:
            raise RuntimeError(f"HTTP target {self.name!r} is not open: use 'async with'")
        try:
            headers, body, msg_id = self._request(event, payload, is_cloudevent)
        except (CloudEventError, orjson.JSONEncodeError, KeyError) as exc:
            # The payload itself is unsendable: no retry can fix it.
            return Answer(failure(f"cannot build the request: {exc}", 0.0, retryable=False))
        if not wait and self._slots.locked():
            cap = self.config.concurrency
            busy = failure(f"concurrency cap of {cap} requests reached", 0.0, retryable=True)
            return Answer(busy, busy=True)
        if self._key is not None:
            now = int(time.time())
            signed_id = webhook_id(msg_id)
            headers["webhook-id"] = signed_id
            headers["webhook-timestamp"] = str(now)
            headers["webhook-signature"] = signature(self._key, signed_id, now, body)
        # Not locked (checked above, nothing awaited since) when not waiting: taken at once.
        async with self._slots:
            start = time.perf_counter()
            oauth = self._oauth
            try:
                if oauth is not None:
                    token = await oauth.token(session)
                    headers["Authorization"] = f"Bearer {token}"
                answer = await self._send(session, headers, body, msg_id, start, wait)
                if oauth is not None and answer.outcome.status == 401:
                    # The function refused the token (revoked, rotated keys): one new token,
                    # one more try; a second 401 stands.
                    headers["Authorization"] = f"Bearer {await oauth.refresh(session, token)}"
                    answer = await self._send(session, headers, body, msg_id, start, wait)
            except TokenError as exc:
                duration_ms = (time.perf_counter() - start) * 1000
                answer = Answer(failure(str(exc), duration_ms, retryable=exc.retryable))
        trace_attempt(log, self.name, msg_id, attempt, answer.outcome)
        return answer

    async def _send(
        self,
        session: aiohttp.ClientSession,
        headers: dict[str, str],
        body: bytes,
        msg_id: str,
        start: float,
        wait: bool,
    ) -> Answer:
        """One request; with ``wait`` False (an invocation) an answer past the read bound is a
        failure rather than a cut-off body."""
        try:
            async with session.post(
                self._url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
                ssl=self._ssl,
                # An event without data arrives without a Content-Type (aiohttp would add one).
                skip_auto_headers=None if "Content-Type" in headers else _NO_CONTENT_TYPE,
            ) as resp:
                content, complete = await _read_bounded(resp.content)
                if not complete:
                    resp.close()
                duration_ms = (time.perf_counter() - start) * 1000
                outcome = self._classify(resp, content, complete, duration_ms, msg_id)
                if not complete and not wait:
                    too_large = f"the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                    return Answer(failure(too_large, duration_ms, retryable=False))
                return Answer(outcome, resp.headers.get("Content-Type"), content)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Answer(
                _outcome_from_error(exc, (time.perf_counter() - start) * 1000, self.config.timeout)
            )

    def _classify(
        self,
        resp: aiohttp.ClientResponse,
        content: bytes,
        complete: bool,
        duration_ms: float,
        msg_id: str,
    ) -> Outcome:
        status = resp.status
        if 200 <= status < 300:
            return Outcome(
                delivered=True,
                status=status,
                duration_ms=duration_ms,
                error=None,
                retryable=False,
                retry_after=None,
                reply=self._reply(resp, content, complete, msg_id),
            )
        text = content[:MAX_ERROR_CHARS].decode(errors="replace").strip()
        error = f"HTTP {status} {resp.reason or ''}".rstrip()
        if 300 <= status < 400:
            # Redirects are not followed: aiohttp would turn the POST into a bodiless GET.
            error += f" (redirect to {resp.headers.get('Location', '?')} not followed)"
        if text:
            error += f": {text}"
        return Outcome(
            delivered=False,
            status=status,
            duration_ms=duration_ms,
            error=truncate_error(error),
            retryable=status in (408, 429) or status >= 500,
            retry_after=(
                parse_retry_after(resp.headers.get("Retry-After")) if status in (429, 503) else None
            ),
            gone=status == 410,
        )

    def _reply(
        self, resp: aiohttp.ClientResponse, content: bytes, complete: bool, msg_id: str
    ) -> dict[str, Any] | None:
        headers = resp.headers
        if "ce-specversion" not in headers and not headers.get("Content-Type", "").startswith(
            "application/cloudevents"
        ):
            return None
        reason: str
        if not complete:
            reason = f"larger than {MAX_RESPONSE_BYTES} bytes"
        else:
            try:
                events = from_http(headers, content, max_size=MAX_RESPONSE_BYTES)
            except CloudEventError as exc:
                reason = exc.detail
            else:
                if len(events) == 1:
                    return events[0]
                reason = f"a batch of {len(events)} events, not one"
        log.warning("target %s: reply to event %s ignored: %s", self.name, msg_id, reason)
        return None
