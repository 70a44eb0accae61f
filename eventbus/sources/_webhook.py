"""The ``webhook`` source: HTTP triggers. Any request to ``/hooks/<name>`` becomes a CloudEvent.

    POST /hooks/<name> ─> the edge (eventbus.http: method, IP lists, API keys, size limit)
                       ─> WebhookSource.event_for: verify the signature, map to a CloudEvent
                       ─> WebhookSource.publish: ctx.emit (on the durable bus) ─> 202

Unlike the other sources this one reads nothing by itself: ``run`` only holds the context the
runner gives it, and the HTTP edge hands it each request. The mapping (documented in
docs/sources.md "webhook"): ``type``, ``id``, ``subject`` and extension attributes are
templates over the request (``{header:X-GitHub-Event}``, ``{query:tenant}``,
``{body:$.id}``); ``source`` is the trigger's; ``time`` is now; ``data`` is the body (JSON
kept as JSON, a form post as an object, UTF-8 text of a declared type as text, anything
else base64). A delivery id taken from the request makes a retried webhook the same event,
which the bus deduplicates. Each verification kind (GitHub, GitLab, Stripe, Slack, Standard
Webhooks, a generic HMAC) is a spec with a ``check``; refusals are CloudEventErrors carrying
the status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    field_validator,
)

from eventbus._errors import CloudEventError
from eventbus.cloudevents import DEFAULT_MAX_EVENT_SIZE, SPEC_VERSION, format_time, validate
from eventbus.config import SourceSpec
from eventbus.config._units import Duration
from eventbus.sources._base import SourceContext

if TYPE_CHECKING:
    from jsonpath_ng import JSONPath

__all__ = ["HookRequest", "WebhookSource", "WebhookSourceSpec"]


def _secret(value: object) -> object:
    """A secret as written in YAML: a string, ``{env: NAME}`` or ``{file: PATH}`` (read once,
    at load; a trailing newline dropped). Kept local until eventbus.config has a Secret type."""
    if not isinstance(value, Mapping):
        if value == "":
            raise ValueError("a secret must not be empty")
        return value
    if len(value) != 1 or not ({"env", "file"} >= set(value)):
        raise ValueError("write a string, {env: NAME} or {file: PATH}")
    if "env" in value:
        found = os.environ.get(str(value["env"]))
        if not found:
            raise ValueError(f"environment variable {value['env']} is not set")
        return found
    try:
        return Path(str(value["file"])).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {value['file']}: {exc.strerror}") from None


Secret = Annotated[SecretStr, BeforeValidator(_secret)]


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR block (IPv4 or IPv6) or one address; host bits set are refused as a likely typo."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"write a CIDR block or an address as a string, not {value!r}")
    try:
        return ipaddress.ip_network(value)
    except ValueError as exc:
        raise ValueError(f"not a CIDR block or address: {exc}") from None


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, PlainValidator(_network)]

_REF = re.compile(r"\{(header|query|body):([^{}]+)\}")


def _unauthorized(detail: str) -> CloudEventError:
    return CloudEventError(detail, status=401, title="Webhook not verified")


def _unreadable(detail: str) -> CloudEventError:
    return CloudEventError(detail, title="Unreadable webhook")


@dataclass(frozen=True)
class HookRequest:
    """One request to a hook: ``headers`` with lower-case names, ``query`` the raw query
    string."""

    method: str
    headers: Mapping[str, str]
    query: str
    body: bytes

    def header(self, name: str) -> str:
        """The header's value; raises 401 when it is missing (a verification header)."""
        found = self.headers.get(name.lower())
        if not found:
            raise _unauthorized(f"header {name} is missing")
        return found

    @cached_property
    def params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)


class Template:
    """Text with ``{header:NAME}``, ``{query:NAME}`` and ``{body:JSONPATH}`` references,
    compiled once; ``render`` gives None when a reference finds nothing. ``body`` is the body
    as the event's data: a JSON body parsed, a form post as an object."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._parts: list[str | tuple[str, str, JSONPath | None]] = []
        end = 0
        for ref in _REF.finditer(text):
            self._parts.append(text[end : ref.start()])
            where, what = ref[1], ref[2].strip()
            self._parts.append((where, what, _jsonpath(what) if where == "body" else None))
            end = ref.end()
        self._parts.append(text[end:])
        if "{" in "".join(p for p in self._parts if isinstance(p, str)):
            raise ValueError(
                f"{text!r}: write references as {{header:NAME}}, {{query:NAME}} or {{body:$.path}}"
            )

    def render(self, request: HookRequest, body: Any = None) -> str | None:
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            found = _lookup(request, body, *part)
            if found is None or found == "":
                return None
            out.append(found)
        return "".join(out)


def _jsonpath(path: str) -> JSONPath:
    # jsonpath-ng is imported here, when a spec is validated, not when eventbus.sources is
    from jsonpath_ng.exceptions import JSONPathError
    from jsonpath_ng.ext.parser import parse

    if not path.startswith("$"):
        raise ValueError(f"a body reference is a JSONPath starting at '$': {path!r}")
    try:
        return parse(path)
    except (JSONPathError, ValueError, TypeError, AttributeError) as exc:
        # jsonpath-ng reports some malformed input as plain Python errors
        raise ValueError(f"invalid JSONPath {path!r}: {exc}") from None


def _lookup(
    request: HookRequest, body: Any, where: str, what: str, path: JSONPath | None
) -> str | None:
    if where == "header":
        return request.headers.get(what.lower())
    if where == "query":
        values = request.params.get(what)
        return values[0] if values else None
    assert path is not None
    try:
        found = path.find(body) if isinstance(body, dict | list) else []
    except Exception:
        return None  # a filter that cannot be followed here selects nothing
    if not found or isinstance(found[0].value, dict | list) or found[0].value is None:
        return None
    value = found[0].value
    return str(value).lower() if isinstance(value, bool) else str(value)


def _template(value: str | None) -> Template | None:
    return None if value is None else Template(value)


def _hmac(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, message, algorithm).digest()


def _same(given: str | bytes, expected: str | bytes) -> bool:
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def _fresh(stamp: str, tolerance: float, now: float) -> None:
    """Refuse a timestamp (Unix seconds) outside ``now ± tolerance``: a replay."""
    try:
        sent = int(stamp)
    except ValueError:
        raise _unauthorized(f"timestamp {stamp[:40]!r} is not Unix seconds") from None
    if abs(now - sent) > tolerance:
        raise _unauthorized(f"timestamp {sent} is outside the {tolerance:g}s tolerance")


class _Verify(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: Secret

    @property
    def key(self) -> bytes:
        return self.secret.get_secret_value().encode()

    def check(self, request: HookRequest, now: float) -> None:
        """Raise CloudEventError 401 unless ``request`` is signed with the secret."""
        raise NotImplementedError


class GitHubVerify(_Verify):
    """``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``."""

    kind: Literal["github"]

    def check(self, request: HookRequest, now: float) -> None:
        given = request.header("X-Hub-Signature-256")
        expected = "sha256=" + _hmac(self.key, request.body).hex()
        if not _same(given, expected):
            raise _unauthorized("X-Hub-Signature-256 does not match the body")


class GitLabVerify(_Verify):
    """``X-Gitlab-Token``: the secret itself."""

    kind: Literal["gitlab"]

    def check(self, request: HookRequest, now: float) -> None:
        if not _same(request.header("X-Gitlab-Token"), self.key):
            raise _unauthorized("X-Gitlab-Token is not the trigger's token")


class StripeVerify(_Verify):
    """``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">[,v1=...]``."""

    kind: Literal["stripe"]
    tolerance: Duration = 300.0

    def check(self, request: HookRequest, now: float) -> None:
        items = [part.partition("=") for part in request.header("Stripe-Signature").split(",")]
        stamps = [value for key, _, value in items if key.strip() == "t"]
        signatures = [value.strip() for key, _, value in items if key.strip() == "v1"]
        if len(stamps) != 1 or not signatures:
            raise _unauthorized("Stripe-Signature needs one t= and a v1= signature")
        _fresh(stamps[0].strip(), self.tolerance, now)
        expected = _hmac(self.key, stamps[0].strip().encode() + b"." + request.body).hex()
        if not any(_same(given, expected) for given in signatures):
            raise _unauthorized("no v1 signature of Stripe-Signature matches the body")


class SlackVerify(_Verify):
    """``X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:<timestamp>:<body>">`` with
    ``X-Slack-Request-Timestamp``."""

    kind: Literal["slack"]
    tolerance: Duration = 300.0

    def check(self, request: HookRequest, now: float) -> None:
        stamp = request.header("X-Slack-Request-Timestamp").strip()
        given = request.header("X-Slack-Signature")
        _fresh(stamp, self.tolerance, now)
        expected = "v0=" + _hmac(self.key, b"v0:" + stamp.encode() + b":" + request.body).hex()
        if not _same(given, expected):
            raise _unauthorized("X-Slack-Signature does not match the body")


class StandardWebhooksVerify(_Verify):
    """``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of
    "id.timestamp.body">`` (several, space-separated); the secret ``whsec_<base64 key>``."""

    kind: Literal["standard-webhooks"]
    tolerance: Duration = 300.0

    @field_validator("secret")
    @classmethod
    def _base64_key(cls, secret: SecretStr) -> SecretStr:
        try:
            base64.b64decode(secret.get_secret_value().removeprefix("whsec_"), validate=True)
        except binascii.Error:
            raise ValueError("a Standard Webhooks secret is whsec_ and a base64 key") from None
        return secret

    @property
    def key(self) -> bytes:
        return base64.b64decode(self.secret.get_secret_value().removeprefix("whsec_"))

    def check(self, request: HookRequest, now: float) -> None:
        msg_id = request.header("webhook-id")
        stamp = request.header("webhook-timestamp").strip()
        given = request.header("webhook-signature")
        _fresh(stamp, self.tolerance, now)
        signed = f"{msg_id}.{stamp}.".encode() + request.body
        expected = base64.b64encode(_hmac(self.key, signed)).decode()
        versions = (part.partition(",") for part in given.split())
        if not any(v == "v1" and _same(sig, expected) for v, _, sig in versions):
            raise _unauthorized("no v1 signature of webhook-signature matches the body")


class HmacVerify(_Verify):
    """A generic HMAC: ``header`` holds ``prefix`` + the digest of ``signed`` (a template;
    ``{body}`` is the raw body) in ``encoding``."""

    kind: Literal["hmac"]
    header: str = Field(min_length=1)
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    signed: str = "{body}"

    @field_validator("signed")
    @classmethod
    def _compiles(cls, signed: str) -> str:
        for part in signed.split("{body}"):
            Template(part)
        return signed

    @cached_property
    def _signed(self) -> list[Template]:
        return [Template(part) for part in self.signed.split("{body}")]

    def check(self, request: HookRequest, now: float) -> None:
        given = request.header(self.header)
        parts = []
        for part in self._signed:
            rendered = part.render(request)
            if rendered is None:
                raise _unauthorized(f"the request lacks a value signed in {self.signed!r}")
            parts.append(rendered.encode())
        digest = _hmac(self.key, request.body.join(parts), self.algorithm)
        encoded = digest.hex() if self.encoding == "hex" else base64.b64encode(digest).decode()
        if not _same(given, self.prefix + encoded):
            raise _unauthorized(f"{self.header} does not match the body")


Verify = Annotated[
    GitHubVerify | GitLabVerify | StripeVerify | SlackVerify | StandardWebhooksVerify | HmacVerify,
    Field(discriminator="kind"),
]

# What each verification kind implies for the event when the trigger does not say.
_PRESETS: dict[str, tuple[str, str | None]] = {
    "github": ("com.github.{header:X-GitHub-Event}", "{header:X-GitHub-Delivery}"),
    "gitlab": ("com.gitlab.{body:$.object_kind}", "{header:X-Gitlab-Event-UUID}"),
    "stripe": ("com.stripe.{body:$.type}", "{body:$.id}"),
    "slack": ("com.slack.{body:$.type}", "{body:$.event_id}"),
    "standard-webhooks": ("{body:$.type}", "{header:webhook-id}"),
    "hmac": ("com.eventbus.webhook", None),
}
_RESERVED = frozenset(
    {"id", "source", "specversion", "type", "time", "subject", "data", "data_base64"}
    | {"datacontenttype", "dataschema"}
)
_EXTENSION = re.compile(r"[a-z0-9]{1,20}\Z")
_METHOD = re.compile(r"[A-Z]{1,16}\Z")


class StaticResponse(BaseModel):
    """What the trigger answers instead of 202 and the event's id (some providers want 200).
    ``body`` is a template: Slack's URL verification wants ``{body:$.challenge}`` back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: int = Field(200, ge=200, le=299)
    body: str = ""
    content_type: str = "text/plain"

    @field_validator("body")
    @classmethod
    def _compiles(cls, body: str) -> str:
        Template(body)
        return body


class WebhookSourceSpec(SourceSpec):
    """A trigger served at ``/hooks/<name>``: who may call it, how it is verified, and the
    event it makes."""

    methods: tuple[str, ...] = Field(("POST",), min_length=1)
    verify: Verify | None = None
    event_type: str | None = None
    """A template; default: the verification kind's (``com.github.{header:X-GitHub-Event}``)
    or ``com.eventbus.webhook``."""
    event_id: str | None = None
    """A template; default: the kind's delivery id. When it finds nothing, a fresh uuid."""
    event_source: str | None = None
    """Default: ``urn:eventbus:source:<name>``."""
    subject: str | None = None
    extensions: dict[str, str] = {}
    """Extension attribute name -> template; left out when its value is missing."""
    max_body: int = Field(256 * 1024, ge=1, le=64 * 1024 * 1024)
    allow: tuple[Network, ...] = ()
    """Client networks allowed (none listed: every one not denied)."""
    deny: tuple[Network, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    """Peers whose ``X-Forwarded-For`` names the client (none listed: the header is ignored)."""
    keys: tuple[Secret, ...] = ()
    """The trigger's own API keys (``Authorization: Bearer`` or ``X-API-Key``)."""
    service_keys: bool | None = None
    """Accept the service's API keys with scope ``publish``; unset: required exactly when the
    trigger has neither ``verify`` nor ``keys`` (and the service has keys)."""
    response: StaticResponse | None = None

    @property
    def takes_service_keys(self) -> bool:
        """Whether the service's API keys open this trigger."""
        if self.service_keys is not None:
            return self.service_keys
        return self.verify is None and not self.keys

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        for method in methods:
            if not _METHOD.match(method):
                raise ValueError(f"{method!r} is not an upper-case HTTP method")
        return tuple(dict.fromkeys(methods))

    @field_validator("event_type", "event_id", "subject")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        _template(value)
        return value

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, extensions: dict[str, str]) -> dict[str, str]:
        for name, value in extensions.items():
            if not _EXTENSION.match(name) or name in _RESERVED:
                raise ValueError(
                    f"extension {name!r}: 1-20 of a-z 0-9, not a CloudEvents attribute"
                )
            Template(value)
        return extensions


def _data(request: HookRequest) -> dict[str, Any]:
    """The body as the event's ``data`` (or ``data_base64``) and its ``datacontenttype``."""
    if not request.body:
        return {}
    declared = request.headers.get("content-type", "").strip()
    media = declared.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            return {"data": orjson.loads(request.body), "datacontenttype": declared}
        except orjson.JSONDecodeError as exc:
            raise _unreadable(f"the body is not valid JSON: {exc}") from None
    if media == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(request.body.decode(), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _unreadable(f"the body is not a valid form post: {exc}") from None
        data = {k: v[0] if len(v) == 1 else v for k, v in form.items()}
        return {"data": data, "datacontenttype": "application/json"}
    content_type = declared or "application/octet-stream"
    if media not in ("", "application/octet-stream"):
        try:
            return {"data": request.body.decode(), "datacontenttype": content_type}
        except UnicodeDecodeError:
            pass
    encoded = base64.b64encode(request.body).decode("ascii")
    return {"data_base64": encoded, "datacontenttype": content_type}


class WebhookSource:
    """The trigger behind ``/hooks/<name>``: ``event_for`` verifies a request and maps it,
    ``publish`` puts the event on the bus while ``run`` holds the runner's context."""

    in_every_process = True
    """Requests reach whichever worker of ``serve --workers N`` took the connection."""

    def __init__(self, spec: WebhookSourceSpec) -> None:
        self.name = spec.name
        self.type = spec.type
        self.spec = spec
        kind = spec.verify.kind if spec.verify is not None else "hmac"
        default_type, default_id = _PRESETS[kind]
        self._type = Template(spec.event_type or default_type)
        self._id = _template(spec.event_id or default_id)
        self._subject = _template(spec.subject)
        self._extensions = {k: Template(v) for k, v in spec.extensions.items()}
        self._source = spec.event_source or f"urn:eventbus:source:{spec.name}"
        self._answer = _template(spec.response.body if spec.response is not None else None)
        self._ctx: SourceContext | None = None

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        try:
            await asyncio.Future()  # requests arrive through the edge until cancelled
        finally:
            self._ctx = None

    def event_for(
        self,
        request: HookRequest,
        *,
        max_size: int = DEFAULT_MAX_EVENT_SIZE,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Verify ``request`` (at ``now``, default the clock's) and map it to a validated
        CloudEvent. Raises CloudEventError: 401 when it does not verify, 400 when the body
        cannot be read, the event type has no value or an attribute is not valid, 413 when
        the event is over ``max_size`` bytes."""
        if self.spec.verify is not None:
            self.spec.verify.check(request, time.time() if now is None else now)
        data = _data(request)
        body = data.get("data")
        event_type = self._type.render(request, body)
        if event_type is None:
            raise _unreadable(f"the request has no value for the event type {self._type.text!r}")
        event_id = self._id.render(request, body) if self._id is not None else None
        event: dict[str, Any] = {
            "specversion": SPEC_VERSION,
            "id": event_id or str(uuid.uuid4()),
            "source": self._source,
            "type": event_type,
            "time": format_time(datetime.now(UTC)),
        }
        if self._subject is not None:
            event["subject"] = self._subject.render(request, body)
        event.update(data)
        for name, template in self._extensions.items():
            event[name] = template.render(request, body)
        # a null attribute is an absent one (validate drops it)
        return validate(event, max_size=max_size)

    def answer(
        self, request: HookRequest, event: dict[str, Any], duplicate: bool
    ) -> tuple[int, str, bytes]:
        """Status, content type and body of the answer to ``request`` once ``event`` is on the
        bus: 202 with the event's id and source and whether it was a ``duplicate`` (as
        ``POST /events`` answers), or the trigger's ``response`` (its body rendered; empty
        when a reference finds nothing)."""
        response = self.spec.response
        if response is None or self._answer is None:
            ids = {"id": event["id"], "source": event["source"], "duplicate": duplicate}
            return 202, "application/json", orjson.dumps(ids)
        body = self._answer.render(request, event.get("data")) or ""
        return response.status, response.content_type, body.encode()

    async def publish(self, event: dict[str, Any]) -> bool:
        """Put ``event`` (from :meth:`event_for`) on the durable bus; returns once it is there:
        True when the bus already held its source+id (a redelivered webhook). Raises
        CloudEventError 503 when the source is not running, BusUnavailable / BusError when the
        bus does not take the event."""
        ctx = self._ctx
        if ctx is None:
            raise CloudEventError(
                f"webhook source {self.name!r} is not running", status=503, title="Not running"
            )
        return await ctx.emit(event)
