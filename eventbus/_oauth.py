"""OAuth 2.0 client credentials (RFC 6749 section 4.4): the tokens HTTP targets present to their
functions and Kafka connections present with SASL OAUTHBEARER, from one client.

Where it sits: under the bus, the targets and the sources, above the configuration whose
``OAuth2Spec`` it serves. The token is fetched with the client's id and secret as HTTP Basic
credentials (form-encoded first, as section 2.3.1 says), kept until shortly before
``expires_in`` runs out, and fetched once however many callers need it at the same moment; a
caller whose token was refused asks for a new one with :meth:`OAuth2Client.refresh`. A token
endpoint that refuses the client (400/401/403) raises a final TokenError carrying its reason;
an unreachable or failing endpoint a retryable one, and the callers waiting for that request
share its failure for ``FAILURE_HOLD`` seconds instead of each asking again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from aiokafka.abc import AbstractTokenProvider

from eventbus.config import KafkaAuth, OAuth2Spec

__all__ = ["OAuth2Client", "TokenError", "kafka_options", "sasl_refusal"]

EXPIRY_MARGIN = 30.0
"""A token is renewed this many seconds before it expires (or at 90 % of a shorter lifetime)."""

FAILURE_HOLD = 1.0
"""Seconds a failed token request answers the deliveries waiting for it before another is made."""

MAX_TOKEN_RESPONSE = 64 * 1024


class TokenError(Exception):
    """The token endpoint gave no token; ``retryable`` says whether trying later may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


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
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()
        self._failure: TokenError | None = None
        self._failed_until = 0.0
        self.fetched = 0
        """How many tokens were fetched (for the metrics of tests and operators)."""

    async def token(self, session: aiohttp.ClientSession | None) -> str:
        """A fresh token, fetched when there is none (or it is about to expire).

        Raises TokenError when the token endpoint gives none.
        """
        token = self._token
        if token is None or time.monotonic() >= self._renew_at:
            async with self._lock:
                # Whoever waited for the lock finds the token the first one fetched.
                if self._token is None or time.monotonic() >= self._renew_at:
                    await self._fetch(session)
                token = self._token
        assert token is not None  # _fetch sets it or raises
        return token

    async def refresh(self, session: aiohttp.ClientSession | None, refused: str) -> str:
        """A new token after the server refused ``refused``: fetched unless another caller
        has already replaced that token. Raises TokenError."""
        async with self._lock:
            if refused == self._token:
                self._token = None
                await self._fetch(session)
        return await self.token(session)

    async def _fetch(self, session: aiohttp.ClientSession | None) -> None:
        # The deliveries queued behind a failed fetch share its failure for a moment instead
        # of each asking the endpoint again (500 deliveries, one refused request).
        if self._failure is not None and time.monotonic() < self._failed_until:
            raise self._failure
        try:
            await self._request(session)
        except TokenError as exc:
            self._failure, self._failed_until = exc, time.monotonic() + FAILURE_HOLD
            raise
        self._failure = None

    async def _request(self, session: aiohttp.ClientSession | None) -> None:
        if session is None:
            async with aiohttp.ClientSession() as own:
                await self._request(own)
            return
        spec, timeout = self._spec, self._timeout
        form = {"grant_type": "client_credentials"}
        if spec.scopes:
            form["scope"] = " ".join(spec.scopes)
        if spec.audience is not None:
            form["audience"] = spec.audience
        # RFC 6749 2.3.1: the id and secret are form-urlencoded before Basic encoding.
        pair = f"{quote(spec.client_id, safe='')}:{quote(spec.client_secret.reveal(), safe='')}"
        headers = {
            "Authorization": "Basic " + base64.b64encode(pair.encode()).decode(),
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
                body = await resp.content.read(MAX_TOKEN_RESPONSE)
                status = resp.status
        except TimeoutError as exc:
            raise TokenError(
                f"{self._about()}: timeout after {timeout:g}s", retryable=True
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TokenError(
                f"{self._about()}: {type(exc).__name__}: {exc}", retryable=True
            ) from exc
        data = _json_object(body)
        if status != 200:
            error = str(data.get("error", "")) if data else ""
            described = str(data.get("error_description", "")) if data else ""
            reason = " ".join(p for p in (f"HTTP {status}", error, described) if p)
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
        lifetime = data.get("expires_in") if data else None
        now = time.monotonic()
        if isinstance(lifetime, int | float) and lifetime > 0:
            self._renew_at = now + max(lifetime - EXPIRY_MARGIN, lifetime * 0.9)
        else:
            self._renew_at = float("inf")  # no stated lifetime: kept until refused
        self._token = token

    def _about(self) -> str:
        return f"{self._where}: OAuth2 token endpoint {self._spec.token_url}"


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


class _KafkaTokens(AbstractTokenProvider):  # type: ignore[misc]
    """aiokafka's OAUTHBEARER token provider over an :class:`OAuth2Client`."""

    def __init__(self, client: OAuth2Client) -> None:
        self._client = client

    async def token(self) -> str:
        return await self._client.token(None)


def kafka_options(auth: KafkaAuth, where: str, timeout: float = 10.0) -> dict[str, Any]:
    """aiokafka client keyword arguments for ``auth`` (``KafkaAuth.kafka_options``), with the
    token provider OAUTHBEARER needs; ``timeout`` bounds one token request.

    Raises ConfigError naming ``where`` when a TLS file cannot be read.
    """
    options = auth.kafka_options(where)
    if auth.oauth2 is not None:
        client = OAuth2Client(auth.oauth2, where, timeout)
        options["sasl_oauth_token_provider"] = _KafkaTokens(client)
    return options


@contextlib.asynccontextmanager
async def sasl_refusal() -> AsyncIterator[None]:
    """Around starting an aiokafka client: what its SASL exchange raises past aiokafka's own
    error types, as OSErrors saying what happened (every Kafka adapter treats OSError as a
    failed connection):

    - a broker that refuses SCRAM credentials in the exchange itself (``e=...`` in its final
      message, as RFC 5802 allows; Tansu does) makes aiokafka fail with a bare ``KeyError('v')``
      (Apache Kafka answers with an error code instead, raised as ``SaslAuthenticationFailed``);
    - OAUTHBEARER's token provider raises TokenError, which aiokafka lets through.

    A refusal becomes PermissionError; a token endpoint that may answer later, ConnectionError.
    """
    try:
        yield
    except KeyError as exc:
        raise PermissionError("the broker refused the SASL credentials") from exc
    except TokenError as exc:
        raise (ConnectionError if exc.retryable else PermissionError)(str(exc)) from exc
