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
which JetStream deduplicates (on Kafka, targets can, on the same ``id``). Each verification
kind (GitHub, GitLab, Stripe, Slack, Standard Webhooks, a generic HMAC) is a spec with a
``check`` (``_signatures``); the request and the templates are ``_hook_request``'s. Refusals
are CloudEventErrors carrying the status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import asyncpg
import orjson
from pydantic import ConfigDict, Field, field_validator, model_validator

from eventbus._burst import Burst
from eventbus._errors import BusError, CloudEventError, StoreError
from eventbus.cloudevents import (
    DEFAULT_MAX_EVENT_SIZE,
    SPEC_VERSION,
    charset_of,
    format_time,
    is_json,
    json_body,
    load_json,
    media_type,
    validate,
)
from eventbus.config import (
    AddressLists,
    NumbersNotBools,
    Secret,
    SourceSpec,
    header_token,
    long_enough,
)
from eventbus.sources._base import SourceContext
from eventbus.sources._hook_request import HookRequest, Template, template
from eventbus.sources._signatures import Verify
from eventbus.store import READ_TIMEOUT, run_db

log = logging.getLogger("eventbus.sources")

__all__ = ["WebhookSource", "WebhookSourceSpec", "body_limit"]


def body_limit(max_event_size: int) -> int:
    """The largest body any trigger reads, whatever its ``max_body``: a larger one cannot
    become an event of ``max_event_size`` bytes (a form's percent-escape takes 3 bytes for
    one, base64 4 for 3), and each body is held whole in memory while it is verified."""
    return 4 * max_event_size


def _unreadable(detail: str) -> CloudEventError:
    return CloudEventError(detail, title="Unreadable webhook")


# What each verification kind implies for the event when the trigger does not say.
_PRESETS: dict[str, tuple[str, str | None]] = {
    "github": ("com.github.{header:X-GitHub-Event}", "{header:X-GitHub-Delivery}"),
    # GitLab's Idempotency-Key stays the same across its retries of one event; its
    # X-Gitlab-Event-UUID is new on each retry and shared by the hooks one request fires (a
    # note and the push before it were one id: the second was dropped as a copy)
    "gitlab": ("com.gitlab.{body:$.object_kind}", "{header:Idempotency-Key}"),
    "stripe": ("com.stripe.{body:$.type}", "{body:$.id}"),
    "slack": ("com.slack.{body:$.type}", "{body:$.event_id}"),
    "standard-webhooks": ("{body:$.type}", "{header:webhook-id}"),
    "hmac": ("com.eventbus.webhook", None),
}
# Where the preset's type has no value: Slack's interactivity posts a form whose payload is
# JSON carrying the type; GitLab's system hooks name their event in event_name, not
# object_kind.
_FALLBACK_TYPES = {
    "slack": "com.slack.{body:$.payload.type}",
    "gitlab": "com.gitlab.{body:$.event_name}",
}
_RESERVED = frozenset(
    {"id", "source", "specversion", "type", "time", "subject", "data", "data_base64"}
    | {"datacontenttype", "dataschema"}
)
_FORM = "application/x-www-form-urlencoded"
# a "%" not followed by two hex digits (and what follows it, for the error)
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2}).{0,2}", re.DOTALL)
_EXTENSION = re.compile(r"[a-z0-9]{1,20}\Z")
_METHOD = re.compile(r"[A-Z]{1,16}\Z")


class StaticResponse(NumbersNotBools):
    """What the trigger answers instead of 202 and the event's id (some providers want 200).
    ``body`` is a template: Slack's URL verification wants ``{body:$.challenge}`` back."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    status: int = Field(200, ge=200, le=299)
    body: str = ""
    content_type: str = "text/plain"

    @field_validator("body")
    @classmethod
    def _compiles(cls, body: str) -> str:
        Template(body)
        return body

    @model_validator(mode="after")
    def _bodiless(self) -> StaticResponse:
        # A 204 or 205 has no body (RFC 9110): one written after it, with its length, was read
        # by a keep-alive client as the start of the next answer (a body rendered from the
        # request could forge that answer for whoever came next on a proxy's connection).
        if self.status in (204, 205) and self.body:
            raise ValueError(f"a {self.status} answer has no body: remove body or use 200")
        return self


class WebhookSourceSpec(AddressLists, SourceSpec):
    """A trigger served at ``/hooks/<name>``: who may call it (``allow``, ``deny`` and
    ``trusted_proxies``: :class:`AddressLists`), how it is verified, and the event it makes."""

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

    @field_validator("keys")
    @classmethod
    def _header_keys(cls, keys: tuple[Secret, ...]) -> tuple[Secret, ...]:
        what = "a trigger key"
        return tuple(header_token(long_enough(key, what), what) for key in keys)

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
        template(value)
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


def _slack_payload(request: HookRequest, data: dict[str, Any]) -> None:
    """Slack's interactivity posts a form of one field, ``payload``, holding the JSON of the
    interaction: read it as JSON (``data.payload.type``), left as text when it is not."""
    form = data.get("data")
    if _media(request.headers) != _FORM or not isinstance(form, dict):
        return
    payload = form.get("payload")
    if isinstance(payload, str) and payload.startswith("{"):
        with contextlib.suppress(orjson.JSONDecodeError):
            form["payload"] = load_json(payload.encode())


def _slash_command(request: HookRequest, body: Any) -> bool:
    """Whether ``body`` is Slack's slash command: a form with ``command`` (a JSON body with a
    ``command`` key, or a GitLab hook's, was typed a slash command too)."""
    return _media(request.headers) == _FORM and isinstance(body, dict) and "command" in body


def _media(headers: Mapping[str, str]) -> str:
    return media_type(headers.get("content-type", ""))


def _github_payload(request: HookRequest, data: dict[str, Any]) -> None:
    """GitHub's form content type (``application/x-www-form-urlencoded``, the default of a
    webhook made through its API) posts the JSON a JSON webhook sends as its one field
    ``payload``: that JSON is the event's data, as with the JSON content type (rules and
    ``{body:...}`` templates read the same event either way). Left as the form when it is
    not JSON."""
    form = data.get("data")
    if _media(request.headers) != _FORM or not isinstance(form, dict) or set(form) != {"payload"}:
        return
    payload = form["payload"]
    if isinstance(payload, str):
        with contextlib.suppress(orjson.JSONDecodeError):
            data["data"] = load_json(payload.encode())


def _data(request: HookRequest) -> dict[str, Any]:
    """The body as the event's ``data`` (or ``data_base64``) and its ``datacontenttype``."""
    if not request.body:
        return {}
    declared = request.headers.get("content-type", "").strip()
    media = media_type(declared)
    if is_json(media):  # as the event's datacontenttype is read: text/json too
        if media.startswith("application/cloudevents"):
            # the body is this event's data, not a CloudEvent: under its declared type a
            # binary-mode delivery told receivers it was the structured event
            declared = "application/json"
        try:
            data, datacontenttype = json_body(request.body, declared)
        except CloudEventError as exc:
            raise _unreadable(exc.detail) from None
        except orjson.JSONDecodeError as exc:
            raise _unreadable(f"the body is not valid JSON: {exc}") from None
        return {"data": data, "datacontenttype": datacontenttype}
    if media == _FORM:
        bad = _BAD_ESCAPE.search(request.body)
        if bad is not None:  # parse_qs keeps it as the text it is: "%ZZ" went out as "%ZZ"
            escape = bad.group().decode("latin-1")
            raise _unreadable(f"the body is not a valid form post: {escape!r} is not a %XX escape")
        try:
            # as the WHATWG form parsing reads it: empty fields skipped, "a" is a=""
            form = parse_qs(request.body.decode(), keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError) as exc:
            raise _unreadable(f"the body is not a valid form post: {exc}") from None
        data = {k: v[0] if len(v) == 1 else v for k, v in form.items()}
        return {"data": data, "datacontenttype": "application/json"}
    content_type = declared or "application/octet-stream"
    if media not in ("", "application/octet-stream"):
        try:  # text in its declared charset (UTF-8 when none), kept as the bytes otherwise
            charset = charset_of(content_type)
        except CloudEventError as exc:
            raise _unreadable(str(exc)) from None
        try:
            return {"data": request.body.decode(charset), "datacontenttype": content_type}
        except UnicodeError:
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
        self._slack = kind == "slack"
        self._github = kind == "github"
        fallback = _FALLBACK_TYPES.get(kind) if spec.event_type is None else None
        self._fallback_type = None if fallback is None else Template(fallback)
        self._id = template(spec.event_id or default_id)
        self._subject = template(spec.subject)
        self._extensions = {k: Template(v) for k, v in spec.extensions.items()}
        self._source = spec.event_source or f"urn:eventbus:source:{spec.name}"
        self._answer = template(spec.response.body if spec.response is not None else None)
        self._ctx: SourceContext | None = None
        window = spec.verify.window if spec.verify is not None else None
        # a signed time: copies of a request verify for as long, remembered here and shared
        self._replays = (
            None if window is None else (_Replays(window), _SharedReplays(spec.name, window))
        )

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        try:
            # requests arrive through the edge until cancelled; meanwhile expired signatures
            # are deleted (here, not in a request's time)
            while True:
                if self._replays is not None:
                    await self._replays[1].prune(ctx.pool)
                await ctx.clock.sleep(_PRUNE_SIGNATURES_EVERY)
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
            self.spec.verify.verify(request, time.time() if now is None else now)
        data = _data(request)
        if self._slack:
            _slack_payload(request, data)
        elif self._github:
            _github_payload(request, data)
        body = data.get("data")
        event_type = self._type.render(request, body)
        if event_type is None and self._fallback_type is not None:
            event_type = self._fallback_type.render(request, body)
            if event_type is None and self._slack and _slash_command(request, body):
                event_type = "com.slack.slash_command"
        if event_type is None:
            tried = repr(self._type.text)
            if self._fallback_type is not None:
                tried += f" nor {self._fallback_type.text!r}"
            raise _unreadable(f"the request has no value for the event type {tried}")
        event_id = self._id.render(request, body) if self._id is not None else None
        if event_id is None and (signature := self.signature_of(request)) is not None:
            # The signature's id, not a random one: a publish that failed on a slow bus (no
            # acknowledgement in time) may have landed all the same, and the sender's retry
            # of the request, published again, was a second event. Under one id the bus's
            # duplicate window drops it, after a restart too.
            event_id = str(uuid.uuid5(_SIGNED_IDS, signature))
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
        for name, extension in self._extensions.items():
            event[name] = extension.render(request, body)
        # a null attribute is an absent one (validate drops it)
        return validate(event, max_size=max_size)

    def unsigned_form(self, headers: Mapping[str, str]) -> bool:
        """Whether a request with ``headers`` may be Slack's check of a slash command's
        certificate (:meth:`ssl_check`): a Slack trigger, a form, no signature."""
        return self._slack and "x-slack-signature" not in headers and _media(headers) == _FORM

    def ssl_check(self, request: HookRequest, *, now: float | None = None) -> bool:
        """Whether ``request`` is Slack's periodic check of a slash command URL's certificate
        (a form of ``ssl_check=1``), answered 200 with nothing published: refused, Slack
        reported the command's URL as failing. Unsigned, it is answered as Slack's own SDKs
        answer it; signed, the signature is verified first (CloudEventError 401)."""
        if not self._slack or _media(request.headers) != _FORM:
            return False
        form = parse_qs(request.body.decode("latin-1"), keep_blank_values=True)
        if form.get("ssl_check") != ["1"]:
            return False
        if "x-slack-signature" in request.headers and self.spec.verify is not None:
            self.spec.verify.verify(request, time.time() if now is None else now)
        return True

    def precheck(self, request: HookRequest, *, now: float | None = None) -> None:
        """Raise CloudEventError 401 for what refuses ``request`` before its body is read (its
        ``body`` empty): a signature header missing, a timestamp out of tolerance."""
        if self.spec.verify is not None:
            self.spec.verify.precheck(request, time.time() if now is None else now)

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

    def signature_of(self, request: HookRequest) -> str | None:
        """The signature of a verified ``request`` whose scheme signs its time, to pass to
        :meth:`publish`; None for other schemes."""
        if self._replays is None or self.spec.verify is None:
            return None
        return self.spec.verify.signature_of(request)

    async def publish(
        self, event: dict[str, Any], signature: str | None = None
    ) -> tuple[bool, str]:
        """Put ``event`` (from :meth:`event_for`) on the durable bus; returns once it is there,
        whether it was a duplicate and the id of the event on the bus. A duplicate: the bus
        already held its source+id (a redelivered webhook), or this process published a
        request of the same ``signature`` (:meth:`signature_of`) within the scheme's
        tolerance (a captured request sent again, which verifies until its timestamp is too
        old, beyond the bus's duplicate window; the Kafka bus has none): then the id is that
        request's event's. A copy that comes while the first is being published waits for
        it: answered as the first was when the bus did not take it (at once, not after a
        publish of its own), published itself when the first ended otherwise. Raises
        CloudEventError 503 when the source is not running, BusUnavailable / BusError when
        the bus does not take the event."""
        ctx = self._ctx
        if ctx is None:
            raise CloudEventError(
                f"webhook source {self.name!r} is not running", status=503, title="Not running"
            )
        if signature is None or self._replays is None:
            return await ctx.emit(event), event["id"]
        replays, shared = self._replays
        while (earlier := replays.find(signature, time.monotonic())) is not None:
            # A copy sent while the first was on its way (a sender's retry on a timeout) was
            # answered "duplicate" at once; when that publish then failed, the event was lost.
            first = await asyncio.shield(earlier)
            if isinstance(first, BusError):
                # The bus did not take the first: the copy is answered as it was, at once (each
                # copy waited for the one before it, then tried itself: 5, 10, 15 s ... on a
                # bus that did not answer). The sender's next retry gets through.
                raise first
            if first is not None:
                return True, first
        published = replays.add(signature, time.monotonic())
        try:
            # published by another process (a worker of serve --workers N, an instance
            # before a restart) within the tolerance: the bus's duplicate window is shorter
            earlier_id = await shared.published(ctx.pool, signature)
            if earlier_id is not None:
                published.set_result(earlier_id)
                return True, earlier_id
            duplicate = await ctx.emit(event)
        except BusError as exc:
            replays.forget(signature, published, exc)  # not on the bus: a retry gets through
            raise
        except BaseException:
            replays.forget(signature, published)  # (its request gone): a copy publishes itself
            raise
        published.set_result(event["id"])
        await shared.remember(ctx.pool, signature, event["id"])
        return duplicate, event["id"]


_SIGNED_IDS = uuid.UUID("5d7f0a52-2b43-4b8e-9a51-3c1b6f0e8d27")  # namespace of the ids above


_Published = str | BusError | None
"""What a copy waiting on a publish learns: the event's id, the bus's refusal, or None (the
publish ended otherwise: the copy publishes itself)."""


class _SharedReplays:
    """The signatures every process published, in PostgreSQL (``webhook_signatures``), for
    twice the tolerance: each process remembers its own (:class:`_Replays`), and a copy sent
    to another worker, or after a restart, was published again once the bus's duplicate
    window (2 minutes) had passed, the signature still valid (5 minutes by default).

    A signature is written once its request's event is on the bus, never before: a copy
    arriving at another process while the first is being published is published too (the
    bus's duplicate window drops it: both carry one id), where a signature written first
    answered it "duplicate" and the event was lost when that first publish failed. The
    database unreachable, a copy is told only by the process's own memory and the bus's
    window (said at most once a minute), not refused: webhooks do not wait on it. Each look
    and write is given :data:`_SHARED_DEADLINE`, and after one fails the table is left alone
    for :data:`_SHARED_PAUSE` (a server that hangs, rather than refusing connections, made
    every signed request wait twice the store's read timeout: 10 s, where Slack wants an
    answer within 3)."""

    def __init__(self, source: str, window: float) -> None:
        self._source = source
        self._keep = 2 * window
        self._unshared = Burst(self._tell_unshared, 60.0)
        self._paused_until = float("-inf")
        # looks and writes under way at once: an abandoned one (a database that hangs) keeps
        # its connection until the database answers, and a burst of them took the whole pool
        self._slots = asyncio.Semaphore(_SHARED_AT_ONCE)

    @staticmethod
    def _digest(signature: str) -> bytes:
        return hashlib.sha256(signature.encode()).digest()

    async def published(self, pool: asyncpg.Pool, signature: str) -> str | None:
        """The id of the event a request of ``signature`` became, if one was published and its
        record has not expired; None otherwise (or when the database does not answer)."""
        found: str | None = await self._shared(
            "looking up a webhook signature",
            lambda: pool.fetchval(
                "SELECT event_id FROM webhook_signatures"
                " WHERE source = $1 AND digest = $2 AND expires_at > now()",
                self._source,
                self._digest(signature),
            ),
        )
        return found

    async def remember(self, pool: asyncpg.Pool, signature: str, event_id: str) -> None:
        """``signature``'s request is on the bus as ``event_id`` (a record of the first one
        to get there, if several did, is kept; an expired one is replaced)."""
        await self._shared(
            "remembering a webhook signature",
            lambda: pool.execute(
                "INSERT INTO webhook_signatures (source, digest, event_id, expires_at)"
                " VALUES ($1, $2, $3, now() + make_interval(secs => $4))"
                " ON CONFLICT (source, digest) DO UPDATE SET event_id = EXCLUDED.event_id,"
                " expires_at = EXCLUDED.expires_at"
                " WHERE webhook_signatures.expires_at < now()",
                self._source,
                self._digest(signature),
                event_id,
                self._keep,
            ),
        )

    async def _shared(self, what: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """``operation()``'s result within :data:`_SHARED_DEADLINE` for a slot and as much
        for the database; None, without waiting, while paused, or when either runs out."""
        if self._paused():
            return None
        try:
            async with asyncio.timeout(_SHARED_DEADLINE):
                await self._slots.acquire()
        except TimeoutError:
            return None  # the slots held by looks the database does not answer
        try:
            if self._paused():  # the look that held the slot found the database hanging
                return None
            return await run_db(what, operation(), deadline=_SHARED_DEADLINE)
        except StoreError as exc:
            self._unremembered(exc)
            return None
        finally:
            self._slots.release()

    async def prune(self, pool: asyncpg.Pool) -> None:
        """Delete the expired signatures (of every trigger: one statement, by its index)."""
        try:
            await run_db(
                "forgetting old webhook signatures",
                pool.execute("DELETE FROM webhook_signatures WHERE expires_at < now()"),
                deadline=READ_TIMEOUT,
            )
        except StoreError as exc:
            log.debug("webhook source %s: expired signatures kept: %s", self._source, exc)

    def _paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def _unremembered(self, exc: StoreError) -> None:
        self._paused_until = time.monotonic() + _SHARED_PAUSE
        self._unshared(str(exc))

    def _tell_unshared(self, why: str, more: int) -> None:
        log.warning(
            "webhook source %s: signatures not shared with the other processes (%s): a copy of "
            "a request sent to another one is told by the bus's duplicate window only%s",
            self._source,
            why,
            f" ({more} more since)" if more else "",
        )


_SHARED_DEADLINE = 1.0
"""Seconds a look into, or a write to, the shared signatures may take: past it the request
goes on without (the bus's duplicate window and the process's memory still tell copies)."""

_SHARED_AT_ONCE = 4
"""Looks and writes of the shared signatures under way at once, per trigger and process; the
others wait for a slot (within :data:`_SHARED_DEADLINE`): a database that hangs keeps each
abandoned one's connection until it answers, and a burst of requests had taken the pool."""

_SHARED_PAUSE = 30.0
"""Seconds the shared signatures are not looked at after a look or a write failed."""

_PRUNE_SIGNATURES_EVERY = 600.0
"""Seconds between deletions of expired signatures, by each running trigger."""


class _Replays:
    """The signatures of requests published in the last ``2 * window`` seconds (a sender's
    clock may run ahead of this one's by up to the window), oldest first, each with the id of
    the event its request became, once that event is on the bus. Only requests that verified
    enter, so only a sender's own rate fills it; past ``most`` the oldest go."""

    def __init__(self, window: float, most: int = 100_000) -> None:
        self._keep = 2 * window
        self._most = most
        self._seen: dict[str, tuple[float, asyncio.Future[_Published]]] = {}

    def find(self, signature: str, now: float) -> asyncio.Future[_Published] | None:
        """The event id of a request of ``signature`` published (done) or being published
        (pending; None if that publish fails), or None when there is no such request."""
        while self._seen:
            oldest, (when, _) = next(iter(self._seen.items()))
            if now - when <= self._keep:
                break
            del self._seen[oldest]
        found = self._seen.get(signature)
        return None if found is None else found[1]

    def forget(
        self, signature: str, published: asyncio.Future[_Published], why: BusError | None = None
    ) -> None:
        """The publish ``published`` (from :meth:`add`) of ``signature``'s request failed (the
        bus's ``why``, or None: ended otherwise): a copy waiting on it learns so, and the entry
        goes if it is still that publish's (it may have gone already, the oldest past ``most``
        or past its time, and the waiting copies with it: resolved here all the same, or they
        waited for ever)."""
        if not published.done():
            published.set_result(why)
        found = self._seen.get(signature)
        if found is not None and found[1] is published:
            del self._seen[signature]

    def add(self, signature: str, now: float) -> asyncio.Future[_Published]:
        """Start publishing ``signature``'s request: set the returned future to its event's id
        once it is on the bus."""
        self._seen.pop(signature, None)
        published: asyncio.Future[_Published] = asyncio.get_running_loop().create_future()
        self._seen[signature] = (now, published)
        if len(self._seen) > self._most:
            del self._seen[next(iter(self._seen))]
        return published
