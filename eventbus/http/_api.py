"""The admin API of the HTTP edge: inspect the audit trail, rules, dead letters and sources,
health and metrics.

Where it sits: a thin layer over the running ``Service`` (``eventbus.app``), its one facade. The
ingest routes (``POST /events``, ``POST /notifications``) are served as bare ASGI by
``_ingest`` in front of this FastAPI application, which serves the rest and the OpenAPI
document of all of them (``GET /openapi.json``, browsable at ``/docs``). Every error is an
RFC 9457 problem+json body with a specific ``detail``.

The handlers are module-level functions with typed parameters (``_params``) on two routers:
``admin`` (every route needs scope ``admin`` when API keys are configured) and ``public``
(``/healthz``, ``/readyz``, ``/metrics``). ``create_app`` puts the service and its ``Access``
on the application's state, where the dependencies below find them.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from eventbus import __version__, metrics
from eventbus._errors import ConfigError, EventBusError, RuleSetError
from eventbus.delivery import DeadLetterFilter
from eventbus.http import _schemas as schemas
from eventbus.http._access import Access, RefusalLog, is_loopback
from eventbus.http._addresses import AddressGate
from eventbus.http._hooks import HOOK_OPERATIONS, HookApp, proxies_for
from eventbus.http._ingest import INGEST_OPERATIONS, IngestApp
from eventbus.http._invoke import caller, invoke
from eventbus.http._params import (
    FILTERING,
    All,
    DeadLetterId,
    Expect,
    Filter,
    Limit,
    Paging,
    PayloadBytes,
    RetryEventId,
    RetrySource,
    RetryTarget,
    Search,
    Selection,
    SourceName,
    TargetName,
    TrailId,
    TrailSource,
    only_parameters,
)
from eventbus.http._problem import PROBLEM, Problem, problem_for
from eventbus.http._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from eventbus.app import Service

__all__ = ["create_app"]

log = logging.getLogger("eventbus.api")


def _service(request: Request) -> Service:
    return cast("Service", request.app.state.service)


async def _admin_scope(request: Request) -> None:
    await caller(request, "admin")


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route, for the document (``_App.openapi`` sets their type)."""
    return {status: {"model": schemas.ProblemDetails} for status in statuses}


admin = APIRouter(dependencies=[Depends(_admin_scope)], responses=_problems(401, 403, 503))
public = APIRouter()


def _json(body: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(body, default=str), status_code=status, media_type="application/json"
    )


@admin.get(
    "/events/trail",
    response_model=schemas.EventTrail,
    responses=_problems(400, 404),
    summary="An event's trail: its acceptance, the rules it matched, every delivery attempt",
)
async def event_trail(
    request: Request, source: TrailSource = None, event_id: TrailId = None
) -> Response:
    if not source or not event_id:
        raise Problem(400, "query parameters 'source' and 'id' are required")
    trail = await _service(request).event_trail(source, event_id)
    if trail is None:
        raise Problem(404, f"no event with source {source!r} and id {event_id!r}")
    return _json(trail.to_dict())


@admin.get(
    "/events",
    response_model=schemas.EventPage,
    responses=_problems(400),
    dependencies=[
        only_parameters("source", "type", "since", "until", "limit", "after", of="GET /events")
    ],
    summary="Accepted events, newest first, by source, type and time, one page at a time",
    description=(
        "From the audit trail: every event the bus stored and the router took (one sent "
        "again after the duplicate window, once per acceptance; a redelivery by the bus or a "
        "replay of a dead letter adds none). `since` and "
        "`until` bound when the bus stored it (`received_at`); `next_after` of an answer "
        "asks for the page after it. `GET /events/trail` gives one event whole."
    ),
)
async def search_events(request: Request, search: Search) -> Response:
    items, cursor = await _service(request).search_events(
        source=search.source,
        type=search.type,
        since=search.since,
        until=search.until,
        limit=search.limit,
        after=search.after,
    )
    return _json({"items": items, "next_after": None if cursor is None else str(cursor)})


@admin.get("/rules", response_model=schemas.Rules, summary="The rules routing now")
async def list_rules(request: Request) -> Response:
    service = _service(request)
    rules = service.current_rules()
    return _json(
        {
            "fingerprint": service.rules_fingerprint(),
            "rules": [
                {
                    "name": r.name,
                    "description": r.description,
                    "enabled": r.enabled,
                    "targets": [t.name for t in r.targets],
                    "file": r.file,
                    "line": r.line,
                    "definition": r.definition,
                }
                for r in rules
            ],
        }
    )


@admin.post(
    "/rules/reload",
    response_model=schemas.Reloaded,
    responses=_problems(400),
    summary="Load the rule files again; an invalid set keeps the current one",
)
async def reload_rules(request: Request) -> Response:
    try:
        count = await _service(request).reload_rules()
    except RuleSetError as exc:
        raise Problem(400, str(exc), title="Invalid rule set; the previous one stays") from None
    except ConfigError as exc:
        raise Problem(400, str(exc), title="Invalid connectors") from None
    service = _service(request)
    return _json(
        {"rules": count, "fingerprint": service.rules_fingerprint(), "notes": service.reload_notes}
    )


@admin.get(
    "/dead-letters",
    response_model=schemas.DeadLetterPage,
    responses=_problems(400),
    summary="Dead letters, newest first, one page at a time",
    dependencies=[only_parameters(*FILTERING, "limit", "after", of="GET /dead-letters")],
)
async def list_dead_letters(request: Request, page: Paging, flt: Filter) -> Response:
    # one more than the page: a page exactly full is the last one when nothing follows it
    # ("Next page" led to an empty one)
    items = await _service(request).dead_letters(flt, limit=page.limit + 1, after=page.after)
    more = len(items) > page.limit
    del items[page.limit :]
    return _json({"items": items, "next_after": items[-1]["id"] if more else None})


@admin.get(
    "/dead-letters/count",
    response_model=schemas.DeadLetterCount,
    responses=_problems(400),
    summary="How many dead letters the filter selects (what a replay or purge by it acts on)",
    dependencies=[only_parameters(*FILTERING, of="GET /dead-letters/count")],
)
async def count_dead_letters(request: Request, flt: Filter) -> Response:
    found = await _service(request).count_dead_letters(flt)
    newest = None if found.newest is None else found.newest.isoformat()
    since = None if flt.since is None else flt.since.isoformat()
    return _json({"count": found.count, "newest": newest, "last_id": found.last_id, "since": since})


@admin.get(
    "/dead-letters/{dl_id}",
    response_model=schemas.DeadLetter,
    responses=_problems(400, 404),
    summary="One dead letter with its event, payload and attempts",
)
async def show_dead_letter(request: Request, dl_id: DeadLetterId) -> Response:
    item = await _service(request).dead_letter(dl_id)
    if item is None:
        raise Problem(404, f"no dead letter {dl_id}")
    return _json(item)


@admin.post(
    "/dead-letters/{dl_id}/replay",
    status_code=202,
    response_model=schemas.Replayed,
    responses=_problems(400, 404),
    summary="Deliver one dead letter again, with a fresh attempt budget",
)
async def replay_one(request: Request, dl_id: DeadLetterId) -> Response:
    replayed, count, notes = await _service(request).replay(DeadLetterFilter(ids=(dl_id,)))
    if not count:
        raise Problem(404, f"no dead letter {dl_id}")
    return _json({"replayed": replayed, "count": count, "truncated": False, "notes": notes}, 202)


@admin.post(
    "/dead-letters/replay",
    status_code=202,
    response_model=schemas.Replayed,
    responses=_problems(400, 409),
    summary="Deliver the dead letters the filter selects again (all=true: every one)",
)
async def replay_many(
    request: Request, flt: Selection, every: All = None, expect: Expect = None
) -> Response:
    _require_filter(flt, every)
    replayed, count, notes = await _service(request).replay(flt, expect=expect)
    truncated = count > len(replayed)
    answer = {"replayed": replayed, "count": count, "truncated": truncated, "notes": notes}
    if flt.ids and flt == DeadLetterFilter(ids=flt.ids) and not truncated:
        # ids given that had no dead letter (answered 202 "count: 1" for two ids, unnamed)
        answer["missing"] = sorted(set(flt.ids) - {item["id"] for item in replayed})
    return _json(answer, 202)


@admin.delete(
    "/dead-letters/{dl_id}",
    response_model=schemas.Purged,
    responses=_problems(400, 404),
    summary="Delete one dead letter",
)
async def delete_one(request: Request, dl_id: DeadLetterId) -> Response:
    n = await _service(request).purge(DeadLetterFilter(ids=(dl_id,)))
    if not n:
        raise Problem(404, f"no dead letter {dl_id}")
    return _json({"purged": n})


@admin.delete(
    "/dead-letters",
    response_model=schemas.Purged,
    responses=_problems(400, 409),
    summary="Delete the dead letters the filter selects (all=true: every one)",
)
async def purge(
    request: Request, flt: Selection, every: All = None, expect: Expect = None
) -> Response:
    _require_filter(flt, every)
    return _json({"purged": await _service(request).purge(flt, expect=expect)})


def _require_filter(flt: DeadLetterFilter, every: str | None) -> None:
    if flt == DeadLetterFilter() and every != "true":
        raise Problem(
            400,
            "give at least one filter (rule, target, status, reason, since, "
            "until, source, id, through) or all=true",
        )


@admin.get(
    "/retries",
    response_model=schemas.Retries,
    responses=_problems(400),
    summary="Deliveries waiting for their next attempt, the next due first",
)
async def list_retries(
    request: Request,
    limit: Limit = 100,
    source: RetrySource = None,
    event_id: RetryEventId = None,
    target: RetryTarget = None,
) -> Response:
    if (source is None) != (event_id is None):
        raise Problem(400, "query parameters 'source' and 'id' go together")
    event = None if source is None or event_id is None else (source, event_id)
    items, total = await _service(request).pending_retries(limit=limit, event=event, target=target)
    return _json({"items": items, "total": total})


@admin.post(
    "/targets/{name}/enable",
    response_model=schemas.Enabled,
    responses=_problems(400, 404),
    summary="Deliver to a target again that was disabled after it answered 410 Gone",
)
async def enable_target(request: Request, name: TargetName) -> Response:
    service = _service(request)
    # idempotent: enabling a target that is not disabled asks for what already is (it was a
    # 404, "not found", for a target that exists; a script enabling every target failed)
    was_disabled = await service.enable_target(name)
    if not was_disabled and name not in service.targets:
        raise Problem(404, f"no target named {name!r}")
    return _json({"enabled": name, "was_disabled": was_disabled})


@admin.get(
    "/targets",
    response_model=schemas.Targets,
    summary="Every target: its circuit's state, whether it is disabled, its retries waiting",
)
async def list_targets(request: Request) -> Response:
    return _json({"targets": await _service(request).describe_targets()})


@admin.get(
    "/sources",
    response_model=schemas.Sources,
    summary="Each source's state, events, errors and lag",
)
async def list_sources(request: Request) -> Response:
    return _json({"sources": [s.to_dict() for s in _service(request).source_statuses()]})


@admin.get(
    "/sources/dead-letters",
    response_model=schemas.SourceDeadLetters,
    responses=_problems(400),
    summary="Input sources could not turn into events, newest first",
)
async def source_dead_letters(
    request: Request,
    source: SourceName = None,
    limit: Limit = 100,
    payload_bytes: PayloadBytes = None,
) -> Response:
    items = await _service(request).source_dead_letters(
        source=source, limit=limit, payload_bytes=payload_bytes
    )
    return _json({"items": items})


@public.get(
    "/healthz",
    response_model=schemas.Liveness,
    responses={503: {"model": schemas.Liveness}},
    summary="Liveness: 503 when the process cannot recover by itself and should be restarted",
)
async def healthz(request: Request) -> Response:
    failed = _service(request).liveness()
    if failed is not None:
        return _json({"status": "failed", "detail": failed}, 503)
    return _json({"status": "ok"})


@public.get(
    "/readyz",
    response_model=schemas.Readiness,
    responses={503: {"model": schemas.Readiness}},
    summary="Readiness: whether events can be taken and routed now, per component",
)
async def readyz(request: Request) -> Response:
    ready, body = await _service(request).readiness()
    return _json(body, 200 if ready else 503)


@public.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def get_metrics() -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


def _answer(problem: Problem, request: Request) -> Response:
    return Response(
        problem.body(request.url.path),
        status_code=problem.status,
        media_type=PROBLEM,
        headers=problem.headers,
    )


async def _on_problem(request: Request, exc: Exception) -> Response:
    return _answer(cast(Problem, exc), request)


async def _on_invalid(request: Request, exc: Exception) -> Response:
    # The parameter checks raise ValueError with the answer's detail; the first one counts.
    first = cast(RequestValidationError, exc).errors()[0]
    error = first.get("ctx", {}).get("error")
    if first["type"] == "value_error" and error is not None:
        detail = str(error)
    else:
        detail = f"{first['loc'][-1]}: {first['msg']}"
    return _answer(Problem(400, detail), request)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    http_error = cast(StarletteHTTPException, exc)
    headers = dict(http_error.headers or {})
    if http_error.status_code == 405:
        # RFC 9110: a 405 says which methods the resource takes. Starlette names those of
        # the first route of the path only (DELETE /dead-letters was left out of GET's).
        headers["Allow"] = ", ".join(_methods_of(request))
    return _answer(
        Problem(http_error.status_code, str(http_error.detail), headers=headers), request
    )


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _methods_of(request: Request) -> list[str]:
    """The methods a route of ``request``'s path takes fully (HEAD wherever GET is, served by
    ``_HeadAsGet``), each asked of the routes as a request of that method would be."""
    routes = request.app.router.routes
    taken = [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    ]
    return [m for method in taken for m in ((method, "HEAD") if method == "GET" else (method,))]


_GONE: Message = {"type": "http.disconnect"}


class _HeadAsGet:
    """ASGI: a HEAD request answered as its GET, without the body (RFC 9110 9.3.2). FastAPI's
    routes take the methods they name only: ``HEAD /healthz`` was refused 405, and an uptime
    check or a load balancer probing with HEAD saw the service down. A streamed answer (the
    live feed) is told the client left once its head is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self._app(scope, receive, send)
            return
        headed = asyncio.Event()

        async def head_only(message: Message) -> None:
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                headed.set()

        async def until_headed() -> Message:
            # a receive under way when the head goes (the live feed waits in one) ends too
            got = asyncio.ensure_future(receive())
            ended = asyncio.ensure_future(headed.wait())
            try:
                await asyncio.wait((got, ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                if not got.done():
                    got.cancel()
            return got.result() if got.done() and not got.cancelled() else _GONE

        await self._app({**scope, "method": "GET"}, until_headed, head_only)


async def _on_error(request: Request, exc: Exception) -> Response:
    problem = problem_for(exc)
    if problem is None:
        log.exception("unhandled error on %s", request.url.path)
        problem = Problem(500, str(exc), title="Internal error")
    return _answer(problem, request)


class _App(FastAPI):
    """FastAPI with the OpenAPI document of the whole edge: the ingest routes ``_ingest``
    serves in front of it included, and every error answer typed problem+json."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        document = super().openapi()
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for model in (
            schemas.CloudEvent,
            schemas.Accepted,
            schemas.BatchAccepted,
            schemas.BrokerAck,
        ):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        for operations in document["paths"].values():
            for operation in operations.values():
                responses = operation["responses"]
                # parameters are checked by eventbus (400 problem), never answered 422
                responses.pop("422", None)
                for response in responses.values():
                    content = response.get("content", {})
                    schema = content.get("application/json", {}).get("schema", {})
                    if schema.get("$ref", "").endswith("/ProblemDetails"):
                        content[PROBLEM] = content.pop("application/json")
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        for path, operations in (*INGEST_OPERATIONS.items(), *HOOK_OPERATIONS.items()):
            # beside the path's FastAPI operations (GET /events)
            document["paths"].setdefault(path, {}).update(copy.deepcopy(operations))
        self.openapi_schema = document
        return document


# Swagger UI's files ship in the package (see its README.md): /docs works offline.
_SWAGGER_UI = Path(__file__).with_name("swagger-ui")
_ASSETS = "/docs/assets"


@public.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    """Swagger UI over ``/openapi.json``, every asset served from the package. No other site
    may frame it (its "Try it out" sends this service's own Origin, as the console does)."""
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="eventbus API",
        swagger_js_url=f"{_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{_ASSETS}/favicon-32x32.png",
        # No badge fetched from validator.swagger.io: the page makes no outside request.
        swagger_ui_parameters={"validatorUrl": None},
    )
    page.headers.update(
        {
            "Content-Security-Policy": "frame-ancestors 'none'",
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
        }
    )
    return page


def create_app(service: Service) -> ASGIApp:
    """The whole HTTP API over a started ``service``: the bare-ASGI ingest routes
    (``_ingest``) in front of a FastAPI application for everything else."""
    from eventbus.http import _console as console

    # one budget of refusal rows a second for the whole edge
    refusals = RefusalLog(service)
    settings = service.settings
    access = Access(
        settings.api_keys,
        refusals,
        local=is_loopback(settings.listen.host),
        trusted=settings.client_addresses.trusted_proxies,
    )
    app = _App(title="eventbus", version=__version__, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.access = access
    app.include_router(admin)
    app.include_router(invoke)
    app.include_router(public)
    app.mount(_ASSETS, StaticFiles(directory=_SWAGGER_UI), name="docs-assets")
    app.include_router(console.admin)  # the web console (lazy: it imports this module)
    app.include_router(console.public)
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(EventBusError, _on_error)
    edge = IngestApp(service, access, HookApp(service, access, refusals, _HeadAsGet(app)))
    lists = service.settings.client_addresses
    if not lists.restricted:
        return edge
    return AddressGate(lists, refusals, edge, proxies_for(service))
