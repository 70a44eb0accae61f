"""The console's routes: the page and its assets, and the API calls only the console needed
so far (each one documented in the OpenAPI document like the rest of the admin API).

    GET  /console, /console/{asset}   the page: HTML, JS and CSS shipped in the package
    GET  /events/live?pattern=...     Server-Sent Events: what the router does with each event
    POST /patterns/validate           is this event pattern valid? (the filter box, as you type)
    POST /rules/sandbox               what the current rules would do with an event, unpublished
    GET  /stats/rates                 events in, routed, delivered ... per second, last hour
    GET  /stats/targets               per target: in flight now; rates, latency, last 5 min

Where it sits: the HTTP edge, over ``Service`` like ``_api``, whose admin scope, answers and
problem bodies it shares; ``_api.create_app`` mounts it. The live stream reads the routers'
feed (``eventbus.router``: every worker's) through ``Service.watch_events``: a bounded queue per
client that loses events when the client falls behind, never slowing a router; it ends when the
server shuts down (the browser reconnects, to any worker). Each message
carries every row gathered in ``_GATHER`` seconds, so 2,000 events/s are ten messages a
second, not 2,000.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from eventbus._errors import CloudEventError, PatternError
from eventbus.cloudevents import parse_json, validate
from eventbus.http._api import _admin_scope, _json, _problems, _service
from eventbus.http._problem import Problem
from eventbus.rules import CompiledPattern, PatternIndex, compile_pattern

if TYPE_CHECKING:
    from eventbus.app import Service
    from eventbus.router import Routed

__all__ = ["admin", "public"]

_GATHER = 0.1  # seconds a message waits for more rows after its first
_KEEPALIVE = 5.0  # seconds between comments on an idle stream, so proxies keep it open
_MAX_ROWS = 1000  # rows in one message at most; the rest follow in the next
# Bytes of a live filter's JSON text: it travels in the stream's URL, and escaped there (up to
# 3 times as long) it must fit the request head's 16 KiB.
_MAX_PATTERN = 4 * 1024

_ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    # its own file: a data: URL icon broke the page's policy (default-src 'self') at each load
    "favicon.svg": "image/svg+xml",
}

admin = APIRouter(dependencies=[Depends(_admin_scope)], responses=_problems(401, 403, 503))
public = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PatternValid(_Body):
    valid: bool


class SandboxRoute(_Body):
    rule: str
    target: str
    payload: Any
    """what the target would receive: the event, or its transform's output"""
    is_cloudevent: bool


class SandboxResult(_Body):
    routes: list[SandboxRoute]
    unmatched: dict[str, str]
    """each enabled rule that took no route, to why: ``pattern: <field>: ...`` (the first
    field its pattern failed on), ``condition: false``, or its condition's run-time error"""
    rules: int
    """how many rules were tried"""


class RatePoint(_Body):
    at: str
    received: float
    routed: float
    matched: float
    delivered: float
    retried: float
    dead_lettered: float
    latency_ms: float | None
    """the mean duration of the delivery attempts in the interval (null: none were made)"""


class RateHistory(_Body):
    """Per-second rates of the service's counters, one point per ``every`` seconds over the
    last hour, oldest first, and the delivery attempts per target and outcome since it
    started; with ``--workers N``, every worker's together."""

    every: float
    points: list[RatePoint]
    targets: dict[str, dict[str, float]]


class TargetActivity(_Body):
    in_flight: int
    """deliveries to the target under way now (waiting for its rate limit, a connection, its
    answer or the record of the outcome)"""
    delivered: float
    """deliveries per second"""
    failed: float
    """deliveries per second that did not succeed (a retry scheduled, dead-lettered, a
    synchronous invocation failed)"""
    latency_ms: float | None
    """the mean duration of its delivery attempts (null: none were made)"""
    p95_ms: float | None
    """their 95th percentile, estimated from the duration histogram's buckets (linear within
    a bucket; beyond the last one, 30 s: at least that)"""


class TargetStats(_Body):
    """Each configured target's deliveries under way now, and its rates and attempt durations
    over the last ``window`` seconds: five minutes, less while the process is younger; with
    ``--workers N``, every worker's together."""

    window: float
    targets: dict[str, TargetActivity]


# The console in no other site's frame: framed, its own requests carry its own origin and pass
# the keyless loopback guard, so a page could lure clicks on "Purge filtered", then "Yes".
# Its scripts and styles are its own files (no inline ones), all it needs.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


@public.get("/", include_in_schema=False)
async def front_page() -> Response:
    """The service's address opened in a browser: the console (a JSON 404 said nothing)."""
    # relative: behind a proxy that serves eventbus under a path, the console is there too
    return Response(status_code=303, headers={"Location": "console"})


@public.get(
    "/console",
    response_class=Response,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
    summary="The web console (asks for an API key when keys are configured)",
)
async def console_page() -> Response:
    return Response(
        _asset("index.html"), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS
    )


@public.get("/console/", include_in_schema=False)
async def console_slash() -> Response:
    """``/console/`` to the page, relatively: the router's own slash redirect named the
    service's address, which behind a proxy serving eventbus under a path is not the page's."""
    return Response(status_code=303, headers={"Location": "../console"})


@public.get(
    "/console/{asset}",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/javascript": {"schema": {"type": "string"}},
                "text/css": {"schema": {"type": "string"}},
                "image/svg+xml": {"schema": {"type": "string"}},
            }
        },
        **_problems(404),
    },
    summary="One of the console's scripts, style sheets or its icon",
)
async def console_asset(asset: str) -> Response:
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise Problem(404, f"no console asset {asset!r}")
    return Response(
        _asset(asset), media_type=media_type, headers={"X-Content-Type-Options": "nosniff"}
    )


def _pattern(text: str) -> CompiledPattern:
    """The compiled pattern of ``text`` (JSON); raises Problem 400 saying what is wrong."""
    if len(text.encode()) > _MAX_PATTERN:
        raise Problem(400, f"pattern: longer than {_MAX_PATTERN} bytes")
    try:
        # as /patterns/validate reads it (an integer beyond 64 bits, rounded, was taken)
        value = parse_json(text.encode())
    except CloudEventError as exc:
        raise Problem(400, f"pattern: {exc.detail}") from None
    try:
        return compile_pattern(value)
    except PatternError as exc:
        raise Problem(400, f"pattern: {exc}") from None


def _accept(pattern: CompiledPattern) -> Callable[[dict[str, Any]], bool]:
    """The stream's filter, run on the router's loop for every event: through the rules'
    index, not the reference ``matches``, whose cost multiplies (1,024 "$or" alternatives
    with a 600-value field took seconds an event, and the whole service waited)."""
    match = PatternIndex([(True, pattern)]).match
    return lambda event: bool(match(event))


def _row(item: Routed) -> dict[str, Any]:
    event = item.event
    return {
        "time": item.received_at,
        "source": event.get("source"),
        "type": event.get("type"),
        "subject": event.get("subject"),
        "id": event.get("id"),
        "rules": item.rules,
        "state": item.state,
        "deliveries": [
            {"rule": rule, "target": target, "state": state}
            for rule, target, state in item.deliveries
        ],
    }


async def _disconnected(request: Request) -> None:
    """Return once the client has gone: a stream waiting for events would otherwise see that
    only at its next write, holding its watcher until then."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(
    request: Request, service: Service, pattern: CompiledPattern | None
) -> AsyncIterator[bytes]:
    gone = asyncio.ensure_future(_disconnected(request))
    first: asyncio.Future[Routed] | None = None
    closed: asyncio.Future[Any] | None = None
    try:
        # The pattern is applied before the client's queue: rows it would not show must not
        # fill the queue and push out rows it would.
        async with service.watch_events(None if pattern is None else _accept(pattern)) as watcher:
            closed = asyncio.ensure_future(watcher.closed.wait())
            yield b"retry: 2000\n: watching\n\n"
            reported = 0
            while True:
                if first is None or first.done():
                    first = asyncio.ensure_future(watcher.get())
                await asyncio.wait(
                    (first, gone, closed), timeout=_KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
                )
                if gone.done() or closed.done():
                    # gone, or the server shutting down: a browser reconnects (to any worker)
                    return
                if not first.done():
                    yield b": idle\n\n"
                    continue
                await asyncio.sleep(_GATHER)
                items = [first.result(), *watcher.pending(_MAX_ROWS - 1)]
                rows = [_row(i) for i in items]
                yield b"event: rows\ndata: " + orjson.dumps(rows, default=str) + b"\n\n"
                if watcher.dropped != reported:
                    reported = watcher.dropped
                    yield b"event: dropped\ndata: " + orjson.dumps({"dropped": reported}) + b"\n\n"
    except OverflowError as exc:
        yield b"event: problem\ndata: " + orjson.dumps({"detail": str(exc)}) + b"\n\n"
    finally:
        for waiting in (gone, first, closed):
            if waiting is not None:
                waiting.cancel()


@admin.get(
    "/events/live",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": (
                "Server-Sent Events. `rows`: a JSON array of routed events (time, source, "
                "type, subject, id, rules, state: routing, unmatched, delivered, retrying or "
                "dead-lettered, the worst of `deliveries`: each delivery's rule, target and "
                "state; an event appears again as its deliveries settle, and again, with time "
                "null and that one delivery, when a delivery from the retry schedule ends). "
                "`dropped`: how many events this client lost so far by reading too slowly."
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **_problems(400),
    },
    summary="A live stream of the events every worker routes, narrowed by an event pattern",
)
async def live_events(
    request: Request,
    pattern: Annotated[
        str | None,
        Query(description="an event pattern as JSON text (the language of rules' match)"),
    ] = None,
) -> Response:
    compiled = None if pattern is None or not pattern.strip() else _pattern(pattern)
    return StreamingResponse(
        _stream(request, _service(request), compiled),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _body_json(request: Request) -> Any:
    limit = _service(request).settings.max_event_size
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Problem(413, f"body larger than max_event_size ({limit} bytes)")
    if not body:
        raise Problem(400, "the body is empty: send JSON")
    return parse_json(bytes(body))


@admin.post(
    "/patterns/validate",
    response_model=PatternValid,
    responses=_problems(400, 413),
    summary="Check an event pattern (the request body, JSON): 400 says what is wrong",
)
async def validate_pattern(request: Request) -> Response:
    value = await _body_json(request)
    try:
        compile_pattern(value)
    except PatternError as exc:
        raise Problem(400, f"pattern: {exc}") from None
    return _json({"valid": True})


@admin.post(
    "/rules/sandbox",
    response_model=SandboxResult,
    responses=_problems(400, 413),
    summary="Run the current rules on an event (the request body) without publishing it",
)
async def rules_sandbox(request: Request) -> Response:
    service = _service(request)
    event = validate(await _body_json(request), max_size=service.settings.max_event_size)
    routes, failed = service.try_rules(event)
    return _json(
        {
            "routes": [
                {
                    "rule": r.rule,
                    "target": r.target,
                    "payload": r.payload,
                    "is_cloudevent": r.is_cloudevent,
                }
                for r in routes
            ],
            "unmatched": failed,
            "rules": len(service.current_rules()),
        }
    )


@admin.get(
    "/stats/rates",
    response_model=RateHistory,
    summary="Events received, routed, matched, delivered, retried, dead-lettered per second",
)
async def rates(request: Request) -> Response:
    return _json(_service(request).rates())


@admin.get(
    "/stats/targets",
    response_model=TargetStats,
    summary="Per target: deliveries in flight, and rates and latency over the last 5 minutes",
)
async def target_stats(request: Request) -> Response:
    return _json(_service(request).target_activity())
