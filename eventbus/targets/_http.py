"""The HTTP function target: delivers one event per POST over kept-alive HTTP/1.1 connections.

Place in the pipeline: last hop of the router. ``deliver`` turns a routed payload into a request
(CloudEvents HTTP binding, or a plain JSON/text body for a transform's output), signs it
(Standard Webhooks) when the target has a secret, and maps whatever happens into an ``Outcome``:
the status classification that drives retries and dead letters, a server-requested
``Retry-After``, and a CloudEvent reply that the router publishes back onto the bus.

Requests go through ``_http1``'s lean client (one connection pool per event loop, shared by
every HTTP target); ``_outcome_from_error`` translates its failures, so none escapes
``deliver``. aiohttp remains only for the OAuth token endpoint (``_oauth``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

import aiohttp
import orjson
from pydantic import Field, field_validator
from yarl import URL

from eventbus._errors import CloudEventError, ConfigError, masked
from eventbus._oauth import OAuth2Client, TokenError
from eventbus.cloudevents import from_http, to_http
from eventbus.config import MIN_SECRET_CHARS, Secret, TargetSpec, TlsSpec, redact_url
from eventbus.targets._base import (
    MAX_ERROR_CHARS,
    Answer,
    Outcome,
    failure,
    retryable_status,
    trace_attempt,
    truncate_error,
)
from eventbus.targets._http1 import (
    CertificateError,
    ConnectError,
    Disconnected,
    DnsError,
    HttpError,
    MalformedResponse,
    Origin,
    Pool,
    Response,
    Ticket,
    TlsRefused,
)
from eventbus.targets._http_auth import (
    CLIENT_HEADERS,
    HEADER_NAME,
    HttpAuthSpec,
    auth_header_name,
    auth_headers,
    auth_secrets,
)
from eventbus.targets._signing import decode_secret, signature, webhook_id

__all__ = ["CONNECTION_LIMIT", "HttpTarget", "HttpTargetSpec", "parse_retry_after"]

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1024 * 1024
"""Response bodies are read up to this size; a larger body is cut off and the connection dropped."""

_IDENTITY = ("specversion", "id", "source", "type")

CONNECTION_LIMIT = 512
"""Requests in flight over all HTTP targets of a process (one shared pool); each target's own
``concurrency`` caps its share. A delivery waiting for a free connection counts towards its
attempt's timeout, and one that got none by then is ``unsent`` (not the target's failure); an
invocation finding none free is answered busy at once."""

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


_T = TypeVar("_T")


class _PerLoop(Generic[_T]):
    """One shared object per event loop (a connection pool, a client session) for every HTTP
    target on it, so file descriptors grow with the endpoints in use, not with the targets
    defined. Reference-counted: the first target to open creates it, the last to close closes
    it."""

    def __init__(
        self,
        make: Callable[[], _T],
        close: Callable[[_T], Awaitable[None]],
        closed: Callable[[_T], bool],
    ) -> None:
        self._make = make
        self._close = close
        self._closed = closed
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Any]] = (
            weakref.WeakKeyDictionary()
        )

    def acquire(self) -> _T:
        loop = asyncio.get_running_loop()
        shared = self._by_loop.get(loop)
        if shared is None or self._closed(shared[0]):
            shared = self._by_loop[loop] = [self._make(), 0]
        shared[1] += 1
        return shared[0]  # type: ignore[no-any-return]

    async def release(self, item: _T) -> None:
        loop = asyncio.get_running_loop()
        shared = self._by_loop.get(loop)
        if shared is None or shared[0] is not item:
            await self._close(item)  # opened on a loop that has since been replaced
            return
        shared[1] -= 1
        if shared[1] == 0:
            del self._by_loop[loop]
            await self._close(item)


def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONNECTION_LIMIT, keepalive_timeout=KEEPALIVE_SECONDS)
    )


_POOLS: _PerLoop[Pool] = _PerLoop(
    lambda: Pool(CONNECTION_LIMIT, KEEPALIVE_SECONDS), Pool.close, lambda pool: pool.closed
)
_SESSIONS: _PerLoop[aiohttp.ClientSession] = _PerLoop(
    _new_session, aiohttp.ClientSession.close, lambda session: session.closed
)
"""For OAuth token endpoints only (``_oauth`` speaks aiohttp)."""


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """The system's trust store, hostnames checked: https without a ``tls`` block."""
    return ssl.create_default_context()


_OWN_SPELLING = {
    name.lower(): name
    for name in ("Content-Type", "User-Agent", "Accept", "Accept-Encoding", "Authorization")
}


def _spelled_as_ours(name: str) -> str:
    """``name`` as eventbus spells the header when it sets it too, so that one dict key holds
    it and the precedence of eventbus's own value (or the static one over a default) holds
    whatever case the target's ``headers`` used: HTTP header names are case-insensitive, and
    two spellings would go out as two headers."""
    lowered = name.lower()
    if lowered.startswith(("ce-", "webhook-")):
        return lowered
    return _OWN_SPELLING.get(lowered, name)


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

    @field_validator("secret")
    @classmethod
    def _strong_enough(cls, secret: Secret | None) -> Secret | None:
        # as a webhook's own secret: a key of a few bytes is guessed from one signed request
        if secret is not None:
            try:
                key = decode_secret(secret.reveal())
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            if len(key) < MIN_SECRET_CHARS:
                raise ValueError(
                    f"a signing secret must hold at least {MIN_SECRET_CHARS} bytes (after "
                    "whsec_, base64 of them: Standard Webhooks secrets hold 24 to 64 random bytes)"
                )
        return secret

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        # Never sent (the request is made from host and path): the function answered 401
        # with nothing to say why.
        try:
            parsed = URL(url)
        except ValueError:
            return url  # the client's own check says what is wrong with it
        if parsed.user is not None or parsed.password is not None:
            raise ValueError(
                "credentials in the url are not sent: use auth: {basic: {username: ..., "
                "password: ...}}"
            )
        return url

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, headers: dict[str, Secret]) -> dict[str, Secret]:
        # A name HTTP cannot carry went out as it was: "X Bad" had every delivery refused by
        # the function (400, dead-lettered), "X-A: x\tX-B" sent a header the file did not name.
        bad = [name for name in headers if HEADER_NAME.fullmatch(name) is None]
        if bad:
            raise ValueError(
                f"{', '.join(map(repr, bad))}: not a header name (letters, digits and "
                "!#$%&'*+-.^_`|~ only)"
            )
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


_NOT_PASSED = frozenset(
    {
        # hop-by-hop (RFC 9110 7.6.1), and the framing and server fields of this connection
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "date",
        "server",
        # given separately, or eventbus's own
        "content-type",
        "retry-after",
        # they would act on eventbus's origin, which serves the console: cookies, its site
        # data, its HTTPS and alternative-service policy
        "set-cookie",
        "set-cookie2",
        "clear-site-data",
        "strict-transport-security",
        "alt-svc",
    }
)


def _passed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a function's answer passed on to a synchronous caller, as an API gateway
    passes them: every end-to-end header (a binary-mode CloudEvent's ``ce-*`` attributes, a
    ``Location``, the function's own ``X-Request-Id``), not the hop-by-hop and framing ones,
    those ``Connection`` names, cookies, the ``Content-Type`` and ``Retry-After`` (given
    separately) or eventbus's own ``X-Eventbus-*``."""
    named = {token.strip().lower() for token in headers.get("connection", "").split(",") if token}
    return {
        name: value
        for name, value in headers.items()
        if name not in _NOT_PASSED and name not in named and not name.startswith("x-eventbus-")
    }


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value (delta-seconds or an HTTP-date).

    Returns None when the value is absent or unreadable; a date in the past gives 0.0, and
    nothing is more than a year (a few hundred digits read as infinity).
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), _YEAR)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), _YEAR)


_YEAR = 365 * 86400.0


def _pool_full(pool: Pool, duration_ms: float) -> Outcome:
    """The ``Outcome`` of a request that got no place in the shared pool: not sent, and not
    the target's failure (``unsent``)."""
    error = (
        f"not sent: all {pool.limit} connections of the HTTP client were carrying requests "
        f"(to this target or others)"
    )
    return failure(error, duration_ms, retryable=True, unsent=True)


def _outcome_from_error(exc: Exception, duration_ms: float, timeout: float) -> Outcome:
    """Translate a failed request into an ``Outcome``: the only place that knows the client's
    failures."""
    if isinstance(exc, TimeoutError):
        return failure(f"timeout after {timeout:g}s", duration_ms, retryable=True, timed_out=True)
    if isinstance(exc, CertificateError):
        # A rejected certificate fails the same way until an operator fixes it: dead-letter it
        # (replayable) rather than hammer the endpoint for a day.
        return failure(str(exc), duration_ms, retryable=False)
    if isinstance(exc, ConnectError) and isinstance(exc.os_error, ConnectionRefusedError):
        return failure(f"connection refused by {exc.host}:{exc.port}", duration_ms, retryable=True)
    if isinstance(exc, DnsError | ConnectError):
        return failure(str(exc), duration_ms, retryable=True)
    if isinstance(exc, TlsRefused):
        # as a rejected certificate: the same until an operator fixes it (tls.cert, tls.key)
        return failure(f"{exc} (tls.cert and tls.key?)", duration_ms, retryable=False)
    if isinstance(exc, Disconnected):
        return failure(str(exc), duration_ms, retryable=True)
    if isinstance(exc, MalformedResponse):
        return failure(f"malformed response: {exc}", duration_ms, retryable=True)
    return failure(f"{type(exc).__name__}: {exc}", duration_ms, retryable=True)


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
            raise ConfigError(f"{where}: invalid url {redact_url(config.url)!r}: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(
                f"{where}: url must be http(s)://host/...: {redact_url(config.url)!r}"
            )
        auth = {} if config.auth is None else auth_headers(config.auth)
        static = {_spelled_as_ours(name): value.reveal() for name, value in config.headers.items()}
        reserved = sorted(name for name in static if name.lower() in CLIENT_HEADERS)
        if reserved:
            raise ConfigError(f"{where}: headers may not set {', '.join(reserved)}")
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
        # What a function that echoes its request (many error pages do) must not have written
        # into the audit trail and dead letters: the credentials, as configured and as sent.
        self._secrets = (
            *(v.reveal() for v in config.headers.values() if v.origin != "plain"),
            *([] if config.auth is None else auth_secrets(config.auth)),
            *(() if self._oauth is None else self._oauth.secrets),
        )
        tls: ssl.SSLContext | None = None
        if url.scheme == "https":
            tls = _default_tls() if config.tls is None else config.tls.context(where)
        assert url.raw_host is not None and url.port is not None
        self._origin = Origin(url.raw_host, url.port, tls)
        host = f"[{url.raw_host}]" if ":" in url.raw_host else url.raw_host
        if not url.is_default_port():
            host = f"{host}:{url.port}"
        self._request_line = f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {host}\r\n"
        self._pool: Pool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.concurrency)
        if config.concurrency > CONNECTION_LIMIT:
            log.warning(
                "target %s: concurrency %d is more than the %d connections all HTTP targets "
                "of a process share; at its cap it holds every one, and the other targets' "
                "requests wait for a connection (invocations are answered 429)",
                self.name,
                config.concurrency,
                CONNECTION_LIMIT,
            )

    @property
    def concurrency(self) -> int:
        """Requests it has in flight at most (``concurrency``); more wait for a slot."""
        return self.config.concurrency

    async def __aenter__(self) -> Self:
        """Join the shared connection pool; raises ``RuntimeError`` if already open."""
        if self._pool is not None:
            raise RuntimeError(f"HTTP target {self.name!r} is already open")
        self._pool = _POOLS.acquire()
        if self._oauth is not None:
            self._session = _SESSIONS.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await _POOLS.release(pool)
        if self._session is not None:
            session, self._session = self._session, None
            await _SESSIONS.release(session)

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
        pool = self._pool
        if pool is None:
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
        # Not locked (checked above, nothing awaited since) when not waiting: taken at once.
        async with self._slots:
            start = time.perf_counter()
            # One deadline for the whole attempt: token, request, and the retry with a fresh
            # token (each had the full timeout: an attempt could take four times it).
            deadline = asyncio.get_running_loop().time() + self.config.timeout
            oauth = self._oauth
            try:
                if oauth is not None:
                    async with asyncio.timeout_at(deadline):
                        token = await oauth.token(self._session)
                    headers["Authorization"] = f"Bearer {token}"
                if self._key is not None:
                    # Stamped once a slot is held: a delivery queued behind the concurrency
                    # cap (minutes, with a slow function) arrived already stale, and the
                    # receiver's 5-minute window refused it (401: dead-lettered).
                    now = int(time.time())
                    signed_id = webhook_id(msg_id)
                    headers["webhook-id"] = signed_id
                    headers["webhook-timestamp"] = str(now)
                    headers["webhook-signature"] = signature(self._key, signed_id, now, body)
                answer = await self._send(pool, headers, body, msg_id, start, deadline, wait)
                if oauth is not None and answer.outcome.status == 401:
                    # The function refused the token (revoked, rotated keys): one new token,
                    # one more try; a second 401 stands.
                    async with asyncio.timeout_at(deadline):
                        fresh = await oauth.refresh(self._session, token)
                    headers["Authorization"] = f"Bearer {fresh}"
                    answer = await self._send(pool, headers, body, msg_id, start, deadline, wait)
            except TokenError as exc:
                duration_ms = (time.perf_counter() - start) * 1000
                answer = Answer(failure(str(exc), duration_ms, retryable=exc.retryable))
            except TimeoutError as exc:  # waiting for a token
                duration_ms = (time.perf_counter() - start) * 1000
                answer = Answer(_outcome_from_error(exc, duration_ms, self.config.timeout))
        trace_attempt(log, self.name, msg_id, attempt, answer.outcome)
        return answer

    async def _send(
        self,
        pool: Pool,
        headers: dict[str, str],
        body: bytes,
        msg_id: str,
        start: float,
        deadline: float,
        wait: bool,
    ) -> Answer:
        """One request, answered by ``deadline`` (the loop's clock); with ``wait`` False (an
        invocation) an answer past the read bound is a failure rather than a cut-off body."""
        # An event without data goes without a Content-Type; nothing adds one.
        lines = [self._request_line]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        request = "".join(lines).encode()
        if not wait and pool.full:
            # An invocation is answered at once rather than wait for a connection that other
            # targets' requests hold (a slow target's backlog timed out a healthy one's calls,
            # and opened its circuit); checked here, after a token was fetched, too.
            return Answer(_pool_full(pool, (time.perf_counter() - start) * 1000), busy=True)
        ticket = Ticket()
        try:
            async with asyncio.timeout_at(deadline):
                resp = await pool.request(
                    self._origin, request, body, max_body=MAX_RESPONSE_BYTES, ticket=ticket
                )
        except (HttpError, TimeoutError, OSError) as exc:
            duration_ms = (time.perf_counter() - start) * 1000
            if isinstance(exc, TimeoutError) and not ticket.admitted:
                # Nothing was sent: the pool's places were all taken until the deadline.
                return Answer(_pool_full(pool, duration_ms), busy=not wait)
            return Answer(_outcome_from_error(exc, duration_ms, self.config.timeout))
        duration_ms = (time.perf_counter() - start) * 1000
        if not resp.complete and not wait:
            too_large = f"the answer is larger than {MAX_RESPONSE_BYTES} bytes"
            return Answer(failure(too_large, duration_ms, retryable=False))
        outcome = self._classify(resp, duration_ms, msg_id, headers.get("Authorization"))
        passed = _passed_headers(resp.headers)
        return Answer(outcome, resp.headers.get("Content-Type"), resp.content, headers=passed)

    def _classify(
        self, resp: Response, duration_ms: float, msg_id: str, authorization: str | None
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
                reply=self._reply(resp, msg_id),
            )
        # masked before it is cut, the cut reaching past the longest secret: one that ran past
        # the cut was matched by no secret whole, and its start was kept
        sent = () if authorization is None else (authorization, authorization.split(" ")[-1])
        secrets = (*self._secrets, *sent)
        reach = MAX_ERROR_CHARS + max((len(s.encode()) for s in secrets), default=0)
        text = masked(resp.content[:reach].decode(errors="replace").strip(), secrets)
        error = f"HTTP {status} {resp.reason or ''}".rstrip()
        if 300 <= status < 400 and "Location" in resp.headers:
            # Redirects are not followed: most clients would turn the POST into a bodiless GET.
            error += f" (redirect to {resp.headers['Location']} not followed)"
        if text:
            error += f": {text}"
        return Outcome(
            delivered=False,
            status=status,
            duration_ms=duration_ms,
            error=truncate_error(error),
            retryable=retryable_status(status),
            retry_after=(
                parse_retry_after(resp.headers.get("Retry-After")) if status in (429, 503) else None
            ),
            gone=status == 410,
        )

    def _reply(self, resp: Response, msg_id: str) -> dict[str, Any] | None:
        headers = resp.headers
        if "ce-specversion" not in headers and not headers.get("Content-Type", "").startswith(
            "application/cloudevents"
        ):
            return None
        reason: str
        if not resp.complete:
            reason = f"larger than {MAX_RESPONSE_BYTES} bytes"
        else:
            try:
                events = from_http(headers, resp.content, max_size=MAX_RESPONSE_BYTES)
            except CloudEventError as exc:
                reason = exc.detail
            except Exception as exc:
                # The function has answered 2xx: a fault in reading its reply must not undo the
                # delivery (it escaped once, and the event was delivered again and again).
                log.exception("target %s: reply to event %s unreadable", self.name, msg_id)
                reason = f"unreadable: {type(exc).__name__}"
            else:
                if len(events) == 1:
                    return events[0]
                reason = f"a batch of {len(events)} events, not one"
        log.warning("target %s: reply to event %s ignored: %s", self.name, msg_id, reason)
        return None
