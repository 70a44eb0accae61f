"""``POST /targets/{name}/invoke``: call one target directly, without a rule.

Where it sits: a route of the admin API (scope ``admin`` when API keys are configured), over
``Service.invoke``. The body is a CloudEvent in any HTTP content mode (structured, or binary
with ``ce-*`` headers) or, for convenience, raw data wrapped into a new event: ``type``,
``source`` and ``subject`` from the query (or the ``X-Eventbus-Type`` / ``-Source`` /
``-Subject`` headers), a generated ``id``, the time now, the body as ``data`` typed by its
``Content-Type``.

``X-Eventbus-Invocation-Type: sync`` (the default) answers with the target's own answer: an
HTTP function's status, ``Content-Type`` and body as they came (a 4xx or 5xx of the function
included), a broker's acknowledgement as JSON; eventbus's own errors are problem+json: 504
(the target's timeout), 502 (unreachable, or an answer too large to pass on), 503 and 429 with
``Retry-After`` (circuit open, concurrency cap full), 409 (target disabled). ``async`` answers
202 once the event is on the durable bus.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator

from eventbus import metrics
from eventbus._errors import CloudEventError
from eventbus.cloudevents import (
    BATCH_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
    format_time,
    header_value,
    parse_http,
)
from eventbus.delivery import Invocation, Refusal
from eventbus.http import _schemas as schemas
from eventbus.http._access import Access
from eventbus.http._params import TargetName
from eventbus.http._problem import Problem, count_refused
from eventbus.http._types import read_body, request_headers

if TYPE_CHECKING:
    from eventbus.app import Service

__all__ = ["ANSWERED_BY_HEADER", "DURATION_HEADER", "INVOCATION_TYPE_HEADER", "caller", "invoke"]

INVOCATION_TYPE_HEADER = "X-Eventbus-Invocation-Type"
DURATION_HEADER = "X-Eventbus-Duration-Ms"
ANSWERED_BY_HEADER = "X-Eventbus-Answered-By"
"""On the target's own answer (its name): how a caller tells it from eventbus's, whatever its
status and Content-Type (a function's 202 or problem+json looked like eventbus's own)."""
DEFAULT_TYPE = "eventbus.invoke"
DEFAULT_SOURCE = "eventbus/invoke"

_REFUSALS = {
    Refusal.UNKNOWN_TARGET: 404,
    Refusal.TARGET_DISABLED: 409,
    Refusal.CIRCUIT_OPEN: 503,
    Refusal.BUSY: 429,
    Refusal.NO_REPLY: 400,
    Refusal.NO_SYNC_RULE: 404,
    Refusal.SYNC_RULES: 409,
    Refusal.SYNC_TRANSFORM: 422,
}


async def caller(request: Request, scope: str) -> str:
    """Who invokes, for the audit: the API key's name, else the client's address. Refuses
    (401/403) a request without ``scope`` when API keys are configured, and (400) one that
    repeats a credential header: a proxy in front may have read the other value."""
    access: Access = request.app.state.access
    headers = request_headers(request.scope["headers"])
    remote = request.client.host if request.client else None
    key = await access.check(headers, request.url.path, remote, scope)
    return f"key={key}" if key is not None else f"remote={remote or 'unknown'}"


async def _invoker(request: Request) -> str:
    return await caller(request, "admin")


async def _publisher(request: Request) -> str:
    return await caller(request, "publish")


def _mode(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in ("sync", "async"):
        raise ValueError(f"{INVOCATION_TYPE_HEADER} must be sync or async, got {raw[:40]!r}")
    return mode


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": schemas.ProblemDetails} for status in statuses}


invoke = APIRouter(responses=_problems(401, 403))

_Attribute = "Used only when the body is not a CloudEvent: the new event's {} (default {})."


@invoke.post(
    "/targets/{name}/invoke",
    response_class=Response,
    summary="Invoke one target directly: sync (its answer) or async (202 once on the bus)",
    responses={
        200: {
            "description": (
                "Sync: the target's answer. An HTTP function's own status (any 2xx, 3xx, 4xx or "
                "5xx), Content-Type and body, passed through; a Kafka or NATS target's "
                "acknowledgement as JSON. Header X-Eventbus-Duration-Ms: the attempt's duration."
            ),
            "content": {
                "*/*": {"schema": {"description": "the function's answer"}},
                "application/json": {"schema": {"$ref": "#/components/schemas/BrokerAck"}},
            },
        },
        202: {"model": schemas.InvocationAccepted, "description": "Async: on the durable bus"},
        **_problems(400, 404, 409, 413, 415, 429, 502, 503, 504),
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                STRUCTURED_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/CloudEvent"}},
                "*/*": {
                    "schema": {
                        "description": (
                            "binary mode (ce-* headers, the body is the data) or raw data "
                            "wrapped into a new event"
                        )
                    }
                },
            },
        }
    },
)
async def invoke_target(
    request: Request,
    name: TargetName,
    invoker: Annotated[str, Depends(_invoker)],
    invocation_type: Annotated[
        Literal["sync", "async"] | None,
        Header(
            alias=INVOCATION_TYPE_HEADER,
            description="sync (default): wait for the target's answer; async: 202 once queued "
            "(either case).",
        ),
        BeforeValidator(_mode),
    ] = None,
    event_type: Annotated[
        str | None, Query(alias="type", description=_Attribute.format("type", DEFAULT_TYPE))
    ] = None,
    source: Annotated[
        str | None, Query(description=_Attribute.format("source", DEFAULT_SOURCE))
    ] = None,
    subject: Annotated[str | None, Query(description=_Attribute.format("subject", "none"))] = None,
    reply: Annotated[
        bool,
        Query(
            description="NATS targets, sync only: send a request and answer with the "
            "subscriber's reply instead of the server's acknowledgement."
        ),
    ] = False,
) -> Response:
    service = cast("Service", request.app.state.service)
    mode = invocation_type or "sync"
    if reply and mode == "async":
        raise Problem(400, "reply=true needs a synchronous invocation")
    limit = service.settings.max_event_size
    headers = request_headers(request.scope["headers"])
    attributes = {"type": event_type, "source": source, "subject": subject}
    try:
        body = await read_body(request.receive, headers, limit)
        event = _event_from_request(headers, body, attributes, max_size=limit)
    except Exception as exc:
        count_refused("invoke", exc)
        raise
    call = service.invoke(name, event, invoker=invoker, asynchronous=mode == "async", reply=reply)
    return _answer(await _unless_cut_off(service, call, event), event, "invoke")


@invoke.post("/events", include_in_schema=False)
async def publish_sync(request: Request, invoker: Annotated[str, Depends(_publisher)]) -> Response:
    """``POST /events`` with ``X-Eventbus-Invocation-Type: sync`` (``IngestApp`` hands it
    here; documented with ``/events``): the one rule marked ``sync: true`` the event matches
    sends it to its target, whose answer is the answer, as for ``/targets/{name}/invoke``."""
    try:
        _mode(request.headers.get(INVOCATION_TYPE_HEADER, ""))
    except ValueError as exc:
        raise Problem(400, str(exc)) from None
    service = cast("Service", request.app.state.service)
    limit = service.settings.max_event_size
    headers = request_headers(request.scope["headers"])
    try:
        body = await read_body(request.receive, headers, limit)
        parsed = parse_http(headers, body, max_size=limit)
        if parsed.batch:
            raise Problem(400, "a synchronous request carries one event, not a batch")
    except Exception as exc:
        count_refused("http:sync", exc)
        raise
    (event,) = cast("list[dict[str, Any]]", parsed.events)
    call = service.invoke_sync_rule(event, invoker=invoker, size=len(body))
    return _answer(await _unless_cut_off(service, call, event), event, "http:sync")


async def _unless_cut_off(
    service: Service, call: Awaitable[Invocation], event: dict[str, Any]
) -> Invocation:
    """``call``'s result. One the server's shutdown cancels (it outlasted
    ``router.shutdown_grace``) is answered 503 with the event's identity, rather than the
    server's bare 500: the caller learns that the function may have run."""
    try:
        return await call
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not service.stopping or task is None:
            raise
        task.uncancel()  # answered instead: the task ends with the answer written
        raise Problem(
            503,
            "the service stopped before the call ended (router.shutdown_grace passed, or a second "
            "signal came): the "
            "function may have run",
            headers=_identity(event),
        ) from None


def _answer(result: Invocation, event: dict[str, Any], via: str) -> Response:
    """The answer to a synchronous invocation (the target's own, or a problem), or 202 for
    an asynchronous one on the bus; ``via`` labels the metrics: an event stored on the bus is
    received, one the bus already held a duplicate (as ``POST /events`` counts them), a
    synchronous one an invocation (it never reaches the bus)."""
    if result.refusal is not None:
        raise _refused(result)
    if result.answer is None:
        counter = metrics.EVENTS_DUPLICATE if result.duplicate else metrics.EVENTS_RECEIVED
    else:
        counter = metrics.INVOCATIONS
    counter.labels(via).inc()
    name = result.target
    identity = _identity(event)
    if result.answer is None:
        # as POST /events says it: a repeat dropped within the bus's window was not invoked
        accepted = {
            "id": event["id"],
            "source": event["source"],
            "target": name,
            "duplicate": result.duplicate,
        }
        if result.duplicate:
            identity["Eventbus-Duplicate"] = "true"
        return Response(orjson.dumps(accepted), 202, identity, "application/json")
    outcome = result.answer.outcome
    identity[DURATION_HEADER] = f"{outcome.duration_ms:.1f}"
    if outcome.status is not None or outcome.delivered:
        headers = {**result.answer.headers, **identity, ANSWERED_BY_HEADER: name}
        if outcome.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(outcome.retry_after))
        if result.answer.content_type is not None:
            # as it came: given as media_type, Starlette adds a charset to text/* types
            headers["Content-Type"] = result.answer.content_type
        return Response(result.answer.body, outcome.status or 200, headers)
    if outcome.timed_out:
        raise Problem(504, f"target {name!r}: {outcome.error}", headers=identity)
    raise Problem(502, f"target {name!r}: {outcome.error}", headers=identity)


def _identity(event: dict[str, Any]) -> dict[str, str]:
    return {
        "X-Eventbus-Event-Id": header_value(event["id"], percent=True),
        "X-Eventbus-Event-Source": header_value(event["source"], percent=True),
    }


def _refused(result: Invocation) -> Problem:
    status = _REFUSALS[cast(Refusal, result.refusal)]
    headers = {}
    if result.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(result.retry_after)))
    return Problem(status, result.detail or str(result.refusal), headers=headers)


def _event_from_request(
    headers: dict[str, str],
    body: bytes,
    attributes: dict[str, str | None],
    *,
    max_size: int,
) -> dict[str, Any]:
    """The one event an invocation request carries: a CloudEvent in structured or binary mode
    as sent, or the body wrapped into a new one. ``headers`` with lower-case names;
    ``attributes`` (type, source, subject) override the ``x-eventbus-<name>`` headers when
    wrapping. Raises CloudEventError: 400 for a batch or an invalid event, 413, 415."""
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if "ce-specversion" in headers or media.startswith("application/cloudevents"):
        if media == BATCH_CONTENT_TYPE:
            raise Problem(400, "an invocation carries one event, not a batch")
        (event,) = parse_http(headers, body, max_size=max_size, max_entries=1).events
        return cast("dict[str, Any]", event)
    values = {"type": DEFAULT_TYPE, "source": DEFAULT_SOURCE}
    # the headers as sent, read as the binding reads ce-* headers (percent-decoded, raw
    # non-ASCII refused: "café" in UTF-8 bytes became "cafÃ©"); the query's text encoded
    wire = {f"ce-{k}": header_value(v, percent=True) for k, v in values.items()}
    for name in attributes:
        sent = headers.get(f"x-eventbus-{name}")
        if sent is not None:
            if not sent.isascii():
                raise Problem(
                    400,
                    f"header 'X-Eventbus-{name.title()}' holds raw non-ASCII bytes: "
                    "percent-encode its UTF-8 (café as caf%C3%A9)",
                )
            wire[f"ce-{name}"] = sent
    for name, value in attributes.items():
        if value is not None:
            wire[f"ce-{name}"] = header_value(value, percent=True)
    wrapped = {
        "ce-specversion": "1.0",
        "ce-id": str(uuid.uuid4()),
        "ce-time": format_time(datetime.now(UTC)),
        **wire,
    }
    if "content-type" in headers:
        wrapped["content-type"] = headers["content-type"]
    try:
        (event,) = parse_http(wrapped, body, max_size=max_size).events
    except CloudEventError as exc:
        # named as the caller sent it ("header 'ce-subject' is not percent-encoded UTF-8"
        # named a header it never sent)
        detail = exc.detail
        for name in attributes:
            if f"x-eventbus-{name}" in headers and attributes[name] is None:
                detail = detail.replace(f"'ce-{name}'", f"'X-Eventbus-{name.title()}'")
        raise CloudEventError(detail, status=exc.status, title=exc.title) from None
    return cast("dict[str, Any]", event)
