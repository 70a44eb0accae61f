"""How an HTTP target authenticates to its function (what EventBridge calls the connection of an
API destination): Basic, an API-key header, a bearer token, or OAuth 2.0 client credentials.

Place in the pipeline: inside the HTTP target, between building a request and sending it.
``auth`` in a target's YAML is one of::

    auth: {basic: {username: eventbus, password: {env: FN_PASSWORD}}}
    auth: {api_key: {header: X-API-Key, value: {env: FN_KEY}}}
    auth: {bearer: {file: /run/secrets/fn-token}}
    auth:
      oauth2:
        token_url: https://idp.example/oauth2/token
        client_id: eventbus
        client_secret: {env: FN_CLIENT_SECRET}
        scopes: [events.write]
        audience: https://fn.example       # optional
        tls: {ca: /etc/ssl/idp-ca.pem}     # optional, for the token endpoint

OAuth 2.0 (RFC 6749 section 4.4): the token is fetched with the client's id and secret as HTTP
Basic credentials, kept until shortly before ``expires_in`` runs out, and fetched once however
many deliveries need it at the same moment. A 401 from the function makes the target fetch a
new token once and send again (:meth:`OAuth2Client.refresh`). A token endpoint that refuses the
client (400/401 with ``invalid_client``, ``unauthorized_client`` ...) fails the delivery as
final, so it dead-letters with the endpoint's reason; an unreachable or failing (5xx) endpoint
is retried like the function itself.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from eventbus.config import Secret, TlsSpec

__all__ = ["HttpAuthSpec", "OAuth2Client", "TokenError", "auth_header_name", "auth_headers"]

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)

EXPIRY_MARGIN = 30.0
"""A token is renewed this many seconds before it expires (or at 90 % of a shorter lifetime)."""

FAILURE_HOLD = 1.0
"""Seconds a failed token request answers the deliveries waiting for it before another is made."""

MAX_TOKEN_RESPONSE = 64 * 1024


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class BasicAuthSpec(_Spec):
    username: str = Field(min_length=1)
    password: Secret


class ApiKeySpec(_Spec):
    header: str = Field("X-API-Key", pattern=_TOKEN.pattern)
    value: Secret


class OAuth2Spec(_Spec):
    token_url: str = Field(pattern=r"^https?://")
    client_id: str = Field(min_length=1)
    client_secret: Secret
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    tls: TlsSpec | None = None


class HttpAuthSpec(_Spec):
    """The ``auth`` block of an HTTP target: exactly one of its four ways."""

    basic: BasicAuthSpec | None = None
    api_key: ApiKeySpec | None = None
    bearer: Secret | None = None
    oauth2: OAuth2Spec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> HttpAuthSpec:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "write exactly one of basic, api_key, bearer, oauth2"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


def auth_header_name(spec: HttpAuthSpec) -> str:
    """The header ``spec`` sets: ``Authorization``, or the API key's own."""
    return spec.api_key.header if spec.api_key is not None else "Authorization"


def auth_headers(spec: HttpAuthSpec) -> dict[str, str]:
    """The headers of Basic, API-key and bearer authentication (none for OAuth 2.0, whose
    header changes with its token)."""
    if spec.basic is not None:
        pair = f"{spec.basic.username}:{spec.basic.password.reveal()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    if spec.api_key is not None:
        return {spec.api_key.header: spec.api_key.value.reveal()}
    if spec.bearer is not None:
        return {"Authorization": "Bearer " + spec.bearer.reveal()}
    return {}


class TokenError(Exception):
    """The token endpoint gave no token; ``retryable`` says whether trying later may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class OAuth2Client:
    """Client-credentials tokens for one target: cached, renewed before expiry, fetched once
    under concurrency. ``where`` names the target in errors; ``timeout`` bounds one token
    request in seconds."""

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

    async def header(self, session: aiohttp.ClientSession) -> dict[str, str]:
        """``Authorization: Bearer <token>``, fetching a token when none is fresh.

        Raises TokenError when the token endpoint gives none.
        """
        token = self._token
        if token is None or time.monotonic() >= self._renew_at:
            async with self._lock:
                # Whoever waited for the lock finds the token the first one fetched.
                if self._token is None or time.monotonic() >= self._renew_at:
                    await self._fetch(session)
                token = self._token
        return {"Authorization": f"Bearer {token}"}

    async def refresh(
        self, session: aiohttp.ClientSession, refused: dict[str, str]
    ) -> dict[str, str]:
        """A new token after the function refused the one in ``refused`` (its headers): fetched
        unless another delivery has already replaced that token. Raises TokenError."""
        async with self._lock:
            if refused.get("Authorization") == f"Bearer {self._token}":
                self._token = None
                await self._fetch(session)
        return await self.header(session)

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
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

    async def _request(self, session: aiohttp.ClientSession) -> None:
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
            # Written out: the shared session sends no default Content-Type.
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
            self._renew_at = float("inf")  # no stated lifetime: kept until the function says 401
        self._token = token

    def _about(self) -> str:
        return f"{self._where}: OAuth2 token endpoint {self._spec.token_url}"


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
