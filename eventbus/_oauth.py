"""Bearer tokens: the ones HTTP targets present to their functions and Kafka connections present
with SASL OAUTHBEARER, each kept in one cache per connection.

Where it sits: under the bus, the targets and the sources, above the configuration whose
``OAuth2Spec`` and ``KafkaAuth`` it serves. A token comes from one of two places:

- an OAuth 2.0 token endpoint, by the client-credentials grant (RFC 6749 section 4.4;
  :class:`OAuth2Client`), with the client's id and secret as HTTP Basic credentials
  (form-encoded first, as section 2.3.1 says);
- a command (Kafka's ``token_command``; :class:`TokenCommand`), run without a shell, that
  prints the token or a JSON object holding it.

Either way the token is kept until shortly before it expires and obtained once however many
callers need it at the same moment; a caller whose token was refused asks for a new one with
:meth:`OAuth2Client.refresh`. A token endpoint that refuses the client (400/401/403) raises a
final TokenError carrying its reason; an unreachable or failing endpoint, or a failing command,
a retryable one, and the callers waiting for that attempt share its failure for
``FAILURE_HOLD`` seconds instead of each trying again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote, quote_plus, urlencode, urlsplit

import aiohttp
import orjson
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from eventbus._errors import ConfigError, masked
from eventbus.config import KafkaAuth, OAuth2Spec, tls_refusal

__all__ = ["OAuth2Client", "TokenCommand", "TokenError", "kafka_options", "start_refusals"]

log = logging.getLogger("eventbus.config")

EXPIRY_MARGIN = 30.0
"""A token is renewed this many seconds before it expires (or at 90 % of a shorter lifetime)."""

FAILURE_HOLD = 1.0
"""Seconds a failed token request answers the deliveries waiting for it before another is made."""

MAX_TOKEN_RESPONSE = 64 * 1024
"""Bytes of a token endpoint's answer, or of a token command's output, that are read."""

TOKEN_TTL = 300.0
"""Seconds a token command's token is taken to live when the command does not say
(``token_ttl`` of the Kafka connection), and an OAuth2 token whose answer has no usable
``expires_in``."""

STDERR_TAIL = 300
"""Characters of a failed token command's stderr (its end) quoted in the error."""


class TokenError(Exception):
    """The token endpoint gave no token; ``retryable`` says whether trying later may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


Obtain = Callable[[], Awaitable[tuple[str, float]]]
"""Gets a new token and its lifetime in seconds (``inf``: kept until refused); raises
TokenError."""


class _TokenCache:
    """One connection's token: renewed ``EXPIRY_MARGIN`` seconds before its lifetime runs out
    (at 90 % of a shorter one), obtained by one caller at a time while the others wait for it,
    a failure shared for ``FAILURE_HOLD`` seconds. Each call says how to obtain a new one."""

    def __init__(self) -> None:
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()
        self._failure: TokenError | None = None
        self._failed_until = 0.0

    async def get(self, obtain: Obtain) -> str:
        """A fresh token, obtained when there is none (or it is about to expire).

        Raises TokenError when none can be obtained.
        """
        token = self._token
        if token is None or time.monotonic() >= self._renew_at:
            async with self._lock:
                # Whoever waited for the lock finds the token the first one obtained.
                if self._token is None or time.monotonic() >= self._renew_at:
                    await self._renew(obtain)
                token = self._token
        assert token is not None  # _renew sets it or raises
        return token

    async def replace(self, refused: str, obtain: Obtain) -> str:
        """A new token after the server refused ``refused``: obtained unless another caller
        has already replaced that token. Raises TokenError."""
        async with self._lock:
            if refused == self._token:
                self._token = None
                await self._renew(obtain)
        return await self.get(obtain)

    async def _renew(self, obtain: Obtain) -> None:
        # The callers queued behind a failed attempt share its failure for a moment instead
        # of each trying again (500 deliveries, one refused request).
        if self._failure is not None and time.monotonic() < self._failed_until:
            raise self._failure
        try:
            token, lifetime = await obtain()
        except TokenError as exc:
            self._failure, self._failed_until = exc, time.monotonic() + FAILURE_HOLD
            raise
        self._failure = None
        self._renew_at = time.monotonic() + max(lifetime - EXPIRY_MARGIN, lifetime * 0.9)
        self._token = token


def _lifetime(value: Any, default: float) -> float:
    """An ``expires_in`` as seconds: a positive number (or a string of one, as some identity
    providers send it), else ``default``."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return default
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    return default


def _basic(spec: OAuth2Spec) -> str:
    """The client's Basic credentials: RFC 6749 2.3.1 form-urlencodes the id and secret
    before the Basic encoding."""
    pair = f"{quote(spec.client_id, safe='')}:{quote(spec.client_secret.reveal(), safe='')}"
    return base64.b64encode(pair.encode()).decode()


class OAuth2Client:
    """Client-credentials tokens for one connection: cached, renewed before expiry, fetched once
    under concurrency. ``where`` names the connection in errors; ``timeout`` bounds one token
    request in seconds. Each call takes the aiohttp session to ask with (the HTTP targets'
    shared one), or None for a session of its own for that request."""

    def __init__(self, spec: OAuth2Spec, where: str, timeout: float) -> None:
        """Raises ConfigError when the ``tls`` block's files cannot be read."""
        self._spec = spec
        self._where = where
        self._timeout = timeout
        self._ssl: ssl.SSLContext | bool = True if spec.tls is None else spec.tls.context(where)
        if spec.token_url.startswith("http://"):
            host = urlsplit(spec.token_url).hostname
            log.warning("%s: the OAuth2 client secret is sent over plain http to %s", where, host)
        self._cache = _TokenCache()
        self.fetched = 0
        """How many tokens were fetched (for the metrics of tests and operators)."""
        secret = spec.client_secret.reveal()
        self.secrets = (secret, quote(secret, safe=""), quote_plus(secret), _basic(spec))
        """The client secret as it may be echoed back (plain, percent-encoded, and the Basic
        credentials that carry it), for masking in error texts."""

    async def token(self, session: aiohttp.ClientSession | None) -> str:
        """A fresh token, fetched when there is none (or it is about to expire).

        Raises TokenError when the token endpoint gives none.
        """
        return await self._cache.get(lambda: self._request(session))

    async def refresh(self, session: aiohttp.ClientSession | None, refused: str) -> str:
        """A new token after the server refused ``refused``: fetched unless another caller
        has already replaced that token. Raises TokenError."""
        return await self._cache.replace(refused, lambda: self._request(session))

    async def _request(self, session: aiohttp.ClientSession | None) -> tuple[str, float]:
        if session is None:
            async with aiohttp.ClientSession() as own:
                return await self._request(own)
        spec, timeout = self._spec, self._timeout
        form = {"grant_type": "client_credentials"}
        if spec.scopes:
            form["scope"] = " ".join(spec.scopes)
        if spec.audience is not None:
            form["audience"] = spec.audience
        headers = {
            "Authorization": "Basic " + _basic(spec),
            "Accept": "application/json",
            # Written out: the HTTP targets' shared session sends no default Content-Type.
            "Content-Type": "application/x-www-form-urlencoded",
        }
        self.fetched += 1
        try:
            async with session.post(
                spec.token_url,
                data=urlencode(form).encode(),
                headers=headers,
                ssl=self._ssl,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                body = await _read_capped(resp.content, MAX_TOKEN_RESPONSE)
                status = resp.status
        except TimeoutError as exc:
            raise TokenError(
                f"{self._about()}: timeout after {timeout:g}s", retryable=True
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TokenError(
                f"{self._about()}: {type(exc).__name__}: {exc}", retryable=True
            ) from exc
        if body is None:
            raise TokenError(
                f"{self._about()}: the answer is larger than {MAX_TOKEN_RESPONSE} bytes",
                retryable=True,
            )
        data = _json_object(body)
        if status != 200:
            error = str(data.get("error", "")) if data else ""
            described = str(data.get("error_description", "")) if data else ""
            reason = " ".join(p for p in (f"HTTP {status}", error, described) if p)
            # the endpoint's own words go into dead letters and logs: never the secret, should
            # it echo the request back
            reason = masked(reason, self.secrets)
            # 400/401/403: the client is unknown, revoked or not allowed this grant or scope;
            # the same request will be refused again until an operator acts.
            final = status in (400, 401, 403)
            refused = "refused client " + repr(spec.client_id) if final else "failed"
            raise TokenError(f"{self._about()} {refused}: {reason}"[:500], retryable=not final)
        token = data.get("access_token") if data else None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n\0"):
            raise TokenError(
                f"{self._about()}: the answer has no usable access_token", retryable=True
            )
        # No stated lifetime: renewed as often as a token_command's (a Kafka connection,
        # unlike an HTTP request, has no refusal to renew on).
        return token, _lifetime(data.get("expires_in") if data else None, TOKEN_TTL)

    def _about(self) -> str:
        return f"{self._where}: OAuth2 token endpoint {self._spec.token_url}"


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes | None:
    """The whole body, however many pieces it arrives in (``read(n)`` returns what is there
    so far), or None past ``cap`` bytes."""
    body = bytearray()
    while chunk := await stream.read(cap + 1 - len(body)):
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


class TokenCommand:
    """Tokens printed by a command (Kafka's ``token_command``) for one connection: cached,
    renewed before expiry, the command run once under concurrency.

    ``argv`` runs without a shell, with eventbus's environment and no input, for at most
    ``timeout`` seconds (then it is killed, with whatever it started). Its output is the token
    itself (one line) or a JSON object with ``token`` or ``access_token`` and optionally
    ``expires_in`` (seconds); a token without ``expires_in`` is taken to live ``ttl`` seconds.
    ``where`` names the connection in errors, which quote the end of the command's stderr but
    never its output.
    """

    def __init__(self, argv: Sequence[str], where: str, timeout: float, ttl: float) -> None:
        """Raises ConfigError when the program ``argv[0]`` is not found or not executable."""
        if shutil.which(argv[0]) is None:
            raise ConfigError(f"{where}: token_command {argv[0]!r}: no such executable program")
        self._argv = tuple(argv)
        self._where = where
        self._timeout = timeout
        self._ttl = ttl
        self._cache = _TokenCache()

    async def token(self) -> str:
        """A fresh token, the command run when there is none (or it is about to expire).

        Raises TokenError (retryable) when the command fails or prints no usable token.
        """
        return await self._cache.get(self._run)

    async def _run(self) -> tuple[str, float]:
        about = f"{self._where}: token_command {self._argv[0]!r}"
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own process group, so that a timeout kills what it started too.
                start_new_session=True,
            )
        except OSError as exc:
            raise TokenError(f"{about} cannot run: {exc.strerror or exc}", retryable=True) from exc
        assert proc.stdout is not None and proc.stderr is not None  # both piped
        out, err = bytearray(), bytearray()
        stderr = asyncio.create_task(_read(proc.stderr, err, STDERR_TAIL * 4, tail=True))
        try:
            async with asyncio.timeout(self._timeout):
                await _read(proc.stdout, out, MAX_TOKEN_RESPONSE, tail=False)
                if len(out) > MAX_TOKEN_RESPONSE:
                    raise TokenError(
                        f"{about} printed more than {MAX_TOKEN_RESPONSE} bytes", retryable=True
                    )
                await stderr
                status = await proc.wait()
        except TimeoutError as exc:
            raise TokenError(
                f"{about} gave no token within {self._timeout:g}s{_tail(err, out)}",
                retryable=True,
            ) from exc
        finally:
            stderr.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if status != 0:
            raise TokenError(
                f"{about} exited with status {status}{_tail(err, out)}", retryable=True
            )
        text = out.decode(errors="replace").strip()
        lifetime: Any = None
        if text.startswith("{"):
            data = _json_object(bytes(out)) or {}
            token = data.get("token", data.get("access_token"))
            lifetime = data.get("expires_in")
        else:
            token = text
        if not isinstance(token, str) or not token or not token.isprintable() or " " in token:
            unusable = "printed no token" if not text else "printed no usable token"
            raise TokenError(f"{about} {unusable}{_tail(err, out)}", retryable=True)
        return token, _lifetime(lifetime, self._ttl)


async def _read(stream: asyncio.StreamReader, into: bytearray, limit: int, *, tail: bool) -> None:
    """Read ``stream`` into ``into`` until it ends, keeping its last ``limit`` bytes (``tail``)
    or stopping once more than ``limit`` bytes came (not ``tail``)."""
    while chunk := await stream.read(64 * 1024):
        into += chunk
        if len(into) > limit:
            if not tail:
                return
            del into[:-limit]


def _tail(err: bytearray, out: bytearray) -> str:
    """``": <the end of stderr>"``, with every longer word of the output (a token the command
    printed on both) masked; ``""`` when stderr is empty."""
    text = " ".join(err.decode(errors="replace").split())
    for word in re.split(r'[\s"{}:,]+', out.decode(errors="replace")):
        if len(word) >= 8:
            text = text.replace(word, "***")
    text = text[-STDERR_TAIL:]
    return f": {text}" if text else ""


class _KafkaTokens(AbstractTokenProvider):  # type: ignore[misc]
    """aiokafka's OAUTHBEARER token provider over a token source (:class:`OAuth2Client`,
    :class:`TokenCommand`)."""

    def __init__(self, token: Callable[[], Awaitable[str]]) -> None:
        self._token = token

    async def token(self) -> str:
        return await self._token()


def kafka_options(auth: KafkaAuth, where: str, timeout: float = 10.0) -> dict[str, Any]:
    """aiokafka client keyword arguments for ``auth`` (``KafkaAuth.kafka_options``), with the
    token provider OAUTHBEARER needs; ``timeout`` bounds one token request or command run.

    Raises ConfigError naming ``where`` when a TLS file cannot be read or the token command's
    program is not found.
    """
    options = auth.kafka_options(where)
    if auth.security_protocol == "SASL_PLAINTEXT" and auth.sasl_mechanism in (
        "PLAIN",
        "OAUTHBEARER",
    ):
        # SCRAM proves the password without sending it; these send it (or the token) as is
        what = "password" if auth.sasl_mechanism == "PLAIN" else "token"
        log.warning(
            "%s: SASL %s over SASL_PLAINTEXT sends the %s in clear; use SASL_SSL",
            where,
            auth.sasl_mechanism,
            what,
        )
    if auth.oauth2 is not None:
        client = OAuth2Client(auth.oauth2, where, timeout)
        options["sasl_oauth_token_provider"] = _KafkaTokens(lambda: client.token(None))
    elif auth.token_command is not None:
        ttl = TOKEN_TTL if auth.token_ttl is None else auth.token_ttl
        command = TokenCommand(auth.token_command, where, timeout, ttl)
        options["sasl_oauth_token_provider"] = _KafkaTokens(command.token)
    return options


@contextlib.asynccontextmanager
async def start_refusals(
    servers: str | Sequence[str] = (),
    options: dict[str, Any] | None = None,
    *,
    within: float | None = None,
) -> AsyncIterator[None]:
    """Around starting an aiokafka client on ``servers`` with ``options`` (from
    :func:`kafka_options`): what it raises for a refused connection, made to say why, as
    OSErrors (every Kafka adapter treats OSError as a failed connection):

    - a broker that refuses SCRAM credentials in the exchange itself (``e=...`` in its final
      message, as RFC 5802 allows; Tansu does) makes aiokafka fail with a bare ``KeyError('v')``
      (Apache Kafka answers with an error code instead, raised as ``SaslAuthenticationFailed``);
    - OAUTHBEARER's token provider raises TokenError, which aiokafka lets through;
    - over SSL, a failed TLS handshake leaves only "Unable to bootstrap from ...": the first
      bootstrap server is asked once more, by :func:`tls_refusal`, and its reason raised.

    A refusal becomes PermissionError; a token endpoint that may answer later, and a TLS
    failure (a server's certificate may be renewed), ConnectionError. With ``within``, the
    start is given that many seconds (TimeoutError); over SSL, a start that ran out of them
    asks the first server too (an SSL client on a port without TLS waits for ever, the server
    waiting for a request it can read).
    """
    refusals = _Refusals(servers)
    _listen_once()
    watching = _WATCHING.set(refusals)
    try:
        async with asyncio.timeout(within):
            yield
    except TimeoutError:
        reason = await _tls_reason(servers, options)
        if reason is None:
            raise
        raise ConnectionError(reason) from None
    except KeyError as exc:
        raise PermissionError("the broker refused the SASL credentials") from exc
    except TokenError as exc:
        raise (ConnectionError if exc.retryable else PermissionError)(str(exc)) from exc
    except KafkaConnectionError as exc:
        if refusals.seen:
            said = refusals.seen[-1]
            what = (
                "does not offer the SASL mechanism"  # not the password's fault
                if said.startswith(UnsupportedSaslMechanismError.__name__)
                else "refused the SASL credentials"
            )
            raise PermissionError(f"the broker {what}: {said}") from exc
        reason = await _tls_reason(servers, options)
        if reason is None:
            raise
        raise ConnectionError(reason) from exc
    finally:
        _WATCHING.reset(watching)


async def _tls_reason(servers: str | Sequence[str], options: dict[str, Any] | None) -> str | None:
    """Why TLS with the first of ``servers`` fails under ``options``' context, None when it
    does not (or when there is no TLS)."""
    context = (options or {}).get("ssl_context")
    first = _first_server(servers)
    if context is None or first is None:
        return None
    reason = await tls_refusal(*first, context)
    host, port = first
    return None if reason is None else f"TLS with {host}:{port} failed: {reason}"


_WATCHING: ContextVar[_Refusals | None] = ContextVar("eventbus_kafka_refusals", default=None)
"""The refusals of the client starting in this task (aiokafka bootstraps in the task that
starts the client, and logs each failed connection there). A handler per client on aiokafka's
logger took every client's: a source refused its password had a healthy target on the same
host told "refused the SASL credentials", dead-lettered after one attempt."""


class _ToStarting(logging.Handler):
    """On aiokafka's logger, once: each error record to the refusals of the client whose
    start logged it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        refusals = _WATCHING.get()
        if refusals is not None:
            refusals.take(record)


_TO_STARTING = _ToStarting()


def _listen_once() -> None:
    logging.getLogger("aiokafka").addHandler(_TO_STARTING)  # a handler already there is kept once


class _Refusals:
    """The SASL refusals aiokafka's bootstrap met on ``servers`` while one client starts.

    aiokafka turns every failed bootstrap connection into "Unable to bootstrap from [...]"; the
    broker's answer (a refused password, a mechanism it does not offer, as Apache Kafka says
    them) is only in the error it logs for the connection (``Unable connect to "host:port":
    <error>``), whose arguments carry the host, the port and the error itself."""

    _REFUSED = (
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
        AuthenticationFailedError,
        IllegalSaslStateError,
    )

    def __init__(self, servers: str | Sequence[str]) -> None:
        listed = servers.split(",") if isinstance(servers, str) else list(servers)
        self._servers = {s for s in map(_host_port, listed) if s is not None}
        self.seen: list[str] = []

    def take(self, record: logging.LogRecord) -> None:
        args = record.args
        if (
            isinstance(args, tuple)
            and len(args) == 3
            and isinstance(args[2], self._REFUSED)
            and (_logged_server(args[0], args[1]) in self._servers or not self._servers)
        ):
            self.seen.append(f"{type(args[2]).__name__}: {args[2]}"[:300])


def _logged_server(host: Any, port: Any) -> tuple[str, int] | None:
    try:
        return str(host).strip("[]"), int(port)
    except (TypeError, ValueError):
        return None


def _first_server(servers: str | Sequence[str]) -> tuple[str, int] | None:
    """The host and port of the first of aiokafka's ``bootstrap_servers`` (``"h1:9093,h2"`` or
    a list), None when there is none."""
    listed = servers.split(",") if isinstance(servers, str) else list(servers)
    first = next((s.strip() for s in listed if s.strip()), None)
    return None if first is None else _host_port(first)


def _host_port(server: str) -> tuple[str, int] | None:
    """One of ``bootstrap_servers`` as host and port (the port defaults to 9092, an IPv6 host
    is bracketed), None when it is none."""
    server = server.strip()
    if not server:
        return None
    if server.startswith("["):  # [::1]:9093
        host, _, rest = server[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in server:
        host, _, port = server.rpartition(":")
    else:
        host, port = server, ""
    try:
        return host, int(port or 9092)
    except ValueError:
        return None
