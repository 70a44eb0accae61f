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

OAuth 2.0 tokens come from ``eventbus._oauth`` (cached, renewed before expiry, fetched once
under concurrency). A 401 from the function makes the target fetch a new token once and send
again. A token endpoint that refuses the client (400/401/403: ``invalid_client``,
``unauthorized_client`` ...) fails the delivery as final, so it dead-letters with the
endpoint's reason; an unreachable or failing (5xx) endpoint is retried like the function.
"""

from __future__ import annotations

import base64
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eventbus.config import OAuth2Spec, Secret

__all__ = [
    "CLIENT_HEADERS",
    "HEADER_NAME",
    "HttpAuthSpec",
    "auth_header_name",
    "auth_headers",
    "auth_secrets",
]

HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""What an HTTP header name may be: an RFC 9110 token (``fullmatch``: ``$`` let "X-A\n" in)."""


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )


class BasicAuthSpec(_Spec):
    username: str = Field(min_length=1)
    password: Secret


CLIENT_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Headers the HTTP client writes itself: neither a target's ``headers`` nor its API key's."""

# Those, the ones eventbus sets (per event: Content-Type, ce-*, webhook-*) and hop-by-hop ones:
# an API key in one went out beside the client's own (Transfer-Encoding with the Content-Length
# it sends, a second Host: a strict server refused every delivery, a lenient one could be
# desynchronized), was replaced by eventbus's value, or asked something of the connection
# (Expect: every delivery answered 417).
_NOT_A_KEY_HEADER = CLIENT_HEADERS | frozenset(
    {
        "content-type",
        "user-agent",
        "accept",
        "accept-encoding",
        "expect",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
    }
)


class ApiKeySpec(_Spec):
    header: str = Field("X-API-Key", pattern=f"^{HEADER_NAME.pattern}$")
    value: Secret

    @field_validator("header")
    @classmethod
    def _not_written_by_eventbus(cls, header: str) -> str:
        lowered = header.lower()
        if lowered in _NOT_A_KEY_HEADER or lowered.startswith(("ce-", "webhook-")):
            raise ValueError(f"{header!r} is a header the client or eventbus writes itself")
        return header


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


def auth_secrets(spec: HttpAuthSpec) -> list[str]:
    """The secrets of Basic, API-key and bearer authentication as configured, for masking in
    error texts (the ``Authorization`` value a request carries is masked with them, as sent;
    OAuth 2.0's: see ``OAuth2Client.secrets``)."""
    if spec.basic is not None:
        return [spec.basic.password.reveal()]
    if spec.api_key is not None:
        return [spec.api_key.value.reveal()]
    if spec.bearer is not None:
        return [spec.bearer.reveal()]
    return []
