"""How a ``webhook`` trigger verifies a request: one spec per provider's scheme (GitHub,
GitLab, Stripe, Slack, Standard Webhooks) and a generic HMAC, each with a ``check`` that raises
CloudEventError 401. Their secrets are :class:`eventbus.config.Secret` (a literal, ``{env:}`` or
``{file:}``), as everywhere else.

Every comparison is made in constant time; schemes with a timestamp refuse one outside their
tolerance (a replayed request).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from functools import cached_property
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eventbus._errors import CloudEventError
from eventbus._rfc3339 import unix_seconds
from eventbus.config import MIN_SECRET_CHARS, Secret, header_token, long_enough
from eventbus.config._units import Duration
from eventbus.sources._hook_request import HookRequest, Template, raw, unauthorized

__all__ = ["Verify"]


def _hmac(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, message, algorithm).digest()


def _same(given: str | bytes, expected: str | bytes) -> bool:
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def _fresh(stamp: str, tolerance: float, now: float) -> None:
    """Refuse a timestamp (Unix seconds) outside ``now ± tolerance``: a replay."""
    sent = unix_seconds(stamp)
    if sent is None:
        raise unauthorized(f"timestamp {stamp[:40]!r} is not Unix seconds")
    if abs(now - sent) > tolerance:
        raise unauthorized(f"timestamp {sent} is outside the {tolerance:g}s tolerance")


class _Verify(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    secret: Secret
    previous_secret: Secret | None = None
    """The secret being replaced, still accepted while the sender moves to the new one (a
    rotation: GitHub, Stripe and the others let a webhook's secret change without a gap)."""

    @property
    def window(self) -> float | None:
        """For how long a signed request verifies (its timestamp's tolerance), or None when
        the scheme signs no time: then a captured request verifies for ever."""
        return None

    def signature_of(self, request: HookRequest) -> str:
        """The signature the secret gives a verified ``request`` (its signed timestamp, body
        and, where signed, id), however it was spelled in its header: a replay of a captured
        request has it again, re-spelled too (the header as sent was another key for each
        order of its parts); a provider's own retry is signed anew (a new timestamp)."""
        raise NotImplementedError

    @field_validator("secret", "previous_secret")
    @classmethod
    def _long_enough(cls, secret: Secret | None) -> Secret | None:
        return None if secret is None else long_enough(secret, "a webhook secret")

    @property
    def key(self) -> bytes:
        return self.secret.reveal().encode()

    def verify(self, request: HookRequest, now: float) -> None:
        """Raise CloudEventError 401 unless ``request`` is signed with the secret or, during
        a rotation, with ``previous_secret`` (the refusal then says what the secret's check
        found)."""
        try:
            self.check(request, now)
        except CloudEventError as refused:
            if self.previous_secret is None:
                raise
            previous = self.model_copy(
                update={"secret": self.previous_secret, "previous_secret": None}
            )
            try:
                previous.check(request, now)
            except CloudEventError:
                raise refused from None

    def check(self, request: HookRequest, now: float) -> None:
        """Raise CloudEventError 401 unless ``request`` is signed with the secret."""
        raise NotImplementedError

    def precheck(self, request: HookRequest, now: float) -> None:
        """Raise CloudEventError 401 for what refuses ``request`` before its body is read
        (``request.body`` is empty): a signature header missing, a timestamp too old. A
        flood of unsigned requests with large bodies cost a read of each body, in memory."""


class _Timestamped(_Verify):
    """A scheme that signs the time of the request, refused outside ``tolerance``."""

    tolerance: Duration = 300.0

    @property
    def window(self) -> float | None:
        return self.tolerance


class GitHubVerify(_Verify):
    """``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``."""

    kind: Literal["github"]

    def precheck(self, request: HookRequest, now: float) -> None:
        request.header("X-Hub-Signature-256")

    def check(self, request: HookRequest, now: float) -> None:
        given = request.header("X-Hub-Signature-256")
        expected = "sha256=" + _hmac(self.key, request.body).hex()
        if not _same(given, expected):
            raise unauthorized("X-Hub-Signature-256 does not match the body")


class GitLabVerify(_Verify):
    """``X-Gitlab-Token``: the secret itself."""

    kind: Literal["gitlab"]

    @field_validator("secret", "previous_secret")
    @classmethod
    def _header_token(cls, secret: Secret | None) -> Secret | None:
        return None if secret is None else header_token(secret, "a GitLab token")

    def precheck(self, request: HookRequest, now: float) -> None:
        self.verify(request, now)  # the token is the whole check

    def check(self, request: HookRequest, now: float) -> None:
        if not _same(request.header("X-Gitlab-Token"), self.key):
            raise unauthorized("X-Gitlab-Token is not the trigger's token")


class StripeVerify(_Timestamped):
    """``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">[,v1=...]``."""

    kind: Literal["stripe"]

    def precheck(self, request: HookRequest, now: float) -> None:
        stamps, signatures = _stripe_parts(request)
        if len(stamps) != 1 or not signatures:
            raise unauthorized("Stripe-Signature needs one t= and a v1= signature")
        _fresh(stamps[0], self.tolerance, now)

    def check(self, request: HookRequest, now: float) -> None:
        self.precheck(request, now)
        _, signatures = _stripe_parts(request)
        expected = self.signature_of(request)
        if not any(_same(given, expected) for given in signatures):
            raise unauthorized("no v1 signature of Stripe-Signature matches the body")

    def signature_of(self, request: HookRequest) -> str:
        stamps, _ = _stripe_parts(request)
        return _hmac(self.key, raw(stamps[0]) + b"." + request.body).hex()


def _stripe_parts(request: HookRequest) -> tuple[list[str], list[str]]:
    """The ``t=`` values and the ``v1=`` signatures of ``Stripe-Signature``."""
    items = [part.partition("=") for part in request.header("Stripe-Signature").split(",")]
    stamps = [value.strip() for key, _, value in items if key.strip() == "t"]
    return stamps, [value.strip() for key, _, value in items if key.strip() == "v1"]


class SlackVerify(_Timestamped):
    """``X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:<timestamp>:<body>">`` with
    ``X-Slack-Request-Timestamp``."""

    kind: Literal["slack"]

    def precheck(self, request: HookRequest, now: float) -> None:
        request.header("X-Slack-Signature")
        _fresh(request.header("X-Slack-Request-Timestamp").strip(), self.tolerance, now)

    def check(self, request: HookRequest, now: float) -> None:
        self.precheck(request, now)
        stamp = request.header("X-Slack-Request-Timestamp").strip()
        given = request.header("X-Slack-Signature")
        if not _same(given, self._digest(stamp, request)):
            raise unauthorized("X-Slack-Signature does not match the body")

    def signature_of(self, request: HookRequest) -> str:
        return self._digest(request.header("X-Slack-Request-Timestamp").strip(), request)

    def _digest(self, stamp: str, request: HookRequest) -> str:
        return "v0=" + _hmac(self.key, b"v0:" + raw(stamp) + b":" + request.body).hex()


class StandardWebhooksVerify(_Timestamped):
    """``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of
    "id.timestamp.body">`` (several, space-separated); the secret ``whsec_<base64 key>``."""

    kind: Literal["standard-webhooks"]

    @field_validator("secret", "previous_secret")
    @classmethod
    def _long_enough(cls, secret: Secret | None) -> Secret | None:
        # In place of the characters counted for the other kinds: the key is what is encoded.
        if secret is None:
            return None
        try:
            key = base64.b64decode(secret.reveal().removeprefix("whsec_"), validate=True)
        except binascii.Error:
            key = b""
        if not key:  # an empty key would make every signature computable by anyone
            raise ValueError("a Standard Webhooks secret is whsec_ and a base64 key")
        if len(key) < MIN_SECRET_CHARS:
            raise ValueError(f"a Standard Webhooks key must have at least {MIN_SECRET_CHARS} bytes")
        return secret

    @property
    def key(self) -> bytes:
        return base64.b64decode(self.secret.reveal().removeprefix("whsec_"))

    def precheck(self, request: HookRequest, now: float) -> None:
        stamp, _ = _standard_signed(request)
        request.header("webhook-signature")
        _fresh(stamp, self.tolerance, now)

    def check(self, request: HookRequest, now: float) -> None:
        self.precheck(request, now)
        _, signed = _standard_signed(request)
        given = request.header("webhook-signature")
        expected = base64.b64encode(_hmac(self.key, signed)).decode()
        versions = (part.partition(",") for part in given.split())
        if not any(v == "v1" and _same(sig, expected) for v, _, sig in versions):
            raise unauthorized("no v1 signature of webhook-signature matches the body")

    def signature_of(self, request: HookRequest) -> str:
        _, signed = _standard_signed(request)
        return base64.b64encode(_hmac(self.key, signed)).decode()


def _standard_signed(request: HookRequest) -> tuple[str, bytes]:
    """The timestamp of a Standard Webhooks request and what its signature signs."""
    msg_id = request.header("webhook-id")
    stamp = request.header("webhook-timestamp").strip()
    return stamp, raw(f"{msg_id}.{stamp}.") + request.body


class HmacVerify(_Verify):
    """A generic HMAC: ``header`` holds ``prefix`` + the digest of ``signed`` (a template;
    ``{body}`` is the raw body) in ``encoding``."""

    kind: Literal["hmac"]
    header: str = Field(min_length=1)
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    signed: str = "{body}"
    timestamp: str | None = Field(None, min_length=1)
    """A header holding the Unix seconds the request was signed at (sign it too, in
    ``signed``): one outside ``tolerance`` is a replay. None: the scheme has no freshness."""
    tolerance: Duration = 300.0

    @field_validator("signed")
    @classmethod
    def _compiles(cls, signed: str) -> str:
        for part in signed.split("{body}"):
            if "body" in Template(part).kinds:
                # the signature is checked before the body is read: such a template loaded,
                # and every request was refused (401) for lacking the value
                raise ValueError(
                    f"{signed!r}: a signature covers the raw body as {{body}}, not values in "
                    "it ({body:$.path}); name headers and query parameters besides"
                )
        return signed

    @cached_property
    def _signed(self) -> list[Template]:
        return [Template(part) for part in self.signed.split("{body}")]

    @model_validator(mode="after")
    def _timestamp_signed(self) -> Self:
        # an unsigned timestamp is whatever a replay says it is
        # as the template reads it: "{header: X-Ts}" names X-Ts too
        headers = {name.lower() for part in self._signed for name in part.names("header")}
        if self.timestamp is not None and self.timestamp.lower() not in headers:
            raise ValueError(
                f"timestamp {self.timestamp!r} must be signed: name "
                f"{{header:{self.timestamp}}} in signed"
            )
        return self

    @property
    def window(self) -> float | None:
        return self.tolerance if self.timestamp is not None else None

    def signature_of(self, request: HookRequest) -> str:
        return request.header(self.header)  # compared exactly: one spelling verifies

    def precheck(self, request: HookRequest, now: float) -> None:
        request.header(self.header)
        if self.timestamp is not None:
            _fresh(request.header(self.timestamp).strip(), self.tolerance, now)

    def check(self, request: HookRequest, now: float) -> None:
        self.precheck(request, now)
        given = request.header(self.header)
        parts = []
        for part in self._signed:
            rendered = part.signed(request)
            if rendered is None:
                raise unauthorized(f"the request lacks a value signed in {self.signed!r}")
            parts.append(rendered)
        digest = _hmac(self.key, request.body.join(parts), self.algorithm)
        encoded = digest.hex() if self.encoding == "hex" else base64.b64encode(digest).decode()
        if not _same(given, self.prefix + encoded):
            raise unauthorized(f"{self.header} does not match the body")


Verify = Annotated[
    GitHubVerify | GitLabVerify | StripeVerify | SlackVerify | StandardWebhooksVerify | HmacVerify,
    Field(discriminator="kind"),
]
