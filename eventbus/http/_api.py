"""The admin API of the HTTP edge: inspect the audit trail, rules, dead letters and sources,
health and metrics.

Where it sits: a thin layer over the running ``Service`` (``eventbus.app``). The ingest routes
(``POST /events``, ``POST /notifications``) are served as bare ASGI by ``_ingest`` in front of
this FastAPI application, which serves the rest. Every error is an RFC 9457
problem+json body with a specific ``detail``.

Access: with API keys configured, every route but ``/healthz``, ``/readyz`` and ``/metrics``
needs ``Authorization: Bearer <key>`` (or ``X-API-Key``). Scope ``publish`` may publish;
``admin`` may do everything. A refused request is answered 401/403 and audited.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from eventbus import metrics
from eventbus._errors import ConfigError, EventBusError, RuleSetError
from eventbus.delivery import DeadLetterFilter
from eventbus.http._access import Access
from eventbus.http._ingest import IngestApp
from eventbus.http._problem import PROBLEM, Problem, problem_for
from eventbus.http._types import ASGIApp

if TYPE_CHECKING:
    from eventbus.app import Service

__all__ = ["create_app"]

log = logging.getLogger("eventbus.api")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, default=str),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _problem(p: Problem, instance: str) -> Response:
    return Response(p.body(instance), status_code=p.status, media_type=PROBLEM, headers=p.headers)


# Parameters are checked against what their PostgreSQL columns can hold, so a value the
# database would refuse is a 400 naming the parameter, not a failed query.
_BIGINT = 64
_INTEGER = 32


def _clip(value: str) -> str:
    return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."


def _text(name: str, value: str) -> str:
    """A text parameter; PostgreSQL text cannot hold U+0000."""
    if "\x00" in value:
        raise Problem(400, f"{name} must not contain the character U+0000")
    return value


def _integer(name: str, raw: str, bits: int = _BIGINT) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise Problem(400, f"{name} must be an integer, got {_clip(raw)}") from None
    bound = 2 ** (bits - 1)
    if not -bound <= value < bound:
        raise Problem(400, f"{name} must be a {bits}-bit integer, got {_clip(raw)}")
    return value


def _moment(name: str, raw: str) -> datetime:
    """An ISO 8601 time; one without a zone is UTC (not the server's local time)."""
    try:
        moment = datetime.fromisoformat(raw)
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        # The instant must exist in UTC, where PostgreSQL receives it.
        moment.astimezone(UTC)
    except ValueError:
        raise Problem(400, f"{name} must be an ISO 8601 time, got {_clip(raw)}") from None
    except OverflowError:
        raise Problem(400, f"{name} must fall within years 0001-9999 in UTC") from None
    return moment


def _query_text(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    return None if raw is None else _text(name, raw)


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise Problem(400, f"limit must be an integer from 1 to 1000, got {_clip(raw)}")
    return int(raw)


def _filter(request: Request) -> DeadLetterFilter:
    q = request.query_params
    return DeadLetterFilter(
        ids=tuple(_integer("id", raw) for raw in q.getlist("id")),
        rule=_query_text(request, "rule"),
        target=_query_text(request, "target"),
        status=_integer("status", q["status"], _INTEGER) if "status" in q else None,
        reason=_query_text(request, "reason"),
        since=_moment("since", q["since"]) if "since" in q else None,
        until=_moment("until", q["until"]) if "until" in q else None,
        source=_query_text(request, "source"),
    )


def create_app(service: Service) -> ASGIApp:
    """The whole HTTP API over a started ``service``: the bare-ASGI ingest routes
    (``_ingest``) in front of a FastAPI application for everything else."""
    access = Access(service.settings.api_keys, service)
    app = FastAPI(title="eventbus", version="0.1.0", docs_url="/docs", redoc_url=None)

    def route(
        method: str, path: str, scope: str | None
    ) -> Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Response]]]:
        def wrap(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                try:
                    if scope is not None:
                        headers = {k.lower(): v for k, v in request.headers.items()}
                        remote = request.client.host if request.client else None
                        await access.check(headers, request.url.path, remote, scope)
                    return await fn(request)
                except Exception as exc:
                    problem = problem_for(exc)
                    if problem is None:
                        raise
                    return _problem(problem, request.url.path)

            endpoint.__name__ = fn.__name__
            app.add_api_route(path, endpoint, methods=[method], include_in_schema=True)
            return fn

        return wrap

    @route("GET", "/events/trail", "admin")
    async def event_trail(request: Request) -> Response:
        source, event_id = _query_text(request, "source"), _query_text(request, "id")
        if not source or not event_id:
            raise Problem(400, "query parameters 'source' and 'id' are required")
        trail = await service.event_trail(source, event_id)
        if trail is None:
            raise Problem(404, f"no event with source {source!r} and id {event_id!r}")
        return _json(trail.to_dict())

    @route("GET", "/rules", "admin")
    async def list_rules(request: Request) -> Response:
        rules = service.current_rules()
        return _json(
            {
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
                ]
            }
        )

    @route("POST", "/rules/reload", "admin")
    async def reload_rules(request: Request) -> Response:
        try:
            count = service.reload_rules()
        except RuleSetError as exc:
            raise Problem(400, str(exc), title="Invalid rule set; the previous one stays") from None
        except ConfigError as exc:
            raise Problem(400, str(exc), title="Invalid connectors") from None
        return _json({"rules": count})

    @route("GET", "/dead-letters", "admin")
    async def list_dead_letters(request: Request) -> Response:
        q = request.query_params
        limit = _limit(request)
        after = _integer("after", q["after"]) if "after" in q else None
        items = await service.dead_letters(_filter(request), limit=limit, after=after)
        nxt = items[-1]["id"] if len(items) == limit else None
        return _json({"items": items, "next_after": nxt})

    @route("GET", "/dead-letters/{dl_id}", "admin")
    async def show_dead_letter(request: Request) -> Response:
        dl_id = _int_path(request, "dl_id")
        item = await service.dead_letter(dl_id)
        if item is None:
            raise Problem(404, f"no dead letter {dl_id}")
        return _json(item)

    @route("POST", "/dead-letters/{dl_id}/replay", "admin")
    async def replay_one(request: Request) -> Response:
        dl_id = _int_path(request, "dl_id")
        replayed = await service.replay(DeadLetterFilter(ids=(dl_id,)))
        if not replayed:
            raise Problem(404, f"no dead letter {dl_id}")
        return _json({"replayed": replayed}, 202)

    @route("POST", "/dead-letters/replay", "admin")
    async def replay_many(request: Request) -> Response:
        flt = _filter(request)
        _require_filter(flt, request)
        return _json({"replayed": await service.replay(flt)}, 202)

    @route("DELETE", "/dead-letters/{dl_id}", "admin")
    async def delete_one(request: Request) -> Response:
        dl_id = _int_path(request, "dl_id")
        n = await service.purge(DeadLetterFilter(ids=(dl_id,)))
        if not n:
            raise Problem(404, f"no dead letter {dl_id}")
        return _json({"purged": n})

    @route("DELETE", "/dead-letters", "admin")
    async def purge(request: Request) -> Response:
        flt = _filter(request)
        _require_filter(flt, request)
        return _json({"purged": await service.purge(flt)})

    @route("POST", "/targets/{name}/enable", "admin")
    async def enable_target(request: Request) -> Response:
        name = _text("target name", request.path_params["name"])
        if not await service.enable_target(name):
            raise Problem(404, f"target {name!r} is not disabled")
        return _json({"enabled": name})

    @route("GET", "/targets", "admin")
    async def list_targets(request: Request) -> Response:
        return _json({"targets": service.describe_targets()})

    @route("GET", "/sources", "admin")
    async def list_sources(request: Request) -> Response:
        return _json({"sources": [s.to_dict() for s in service.source_statuses()]})

    @route("GET", "/sources/dead-letters", "admin")
    async def source_dead_letters(request: Request) -> Response:
        items = await service.source_dead_letters(
            source=_query_text(request, "source"), limit=_limit(request)
        )
        return _json({"items": items})

    @route("GET", "/healthz", None)
    async def healthz(request: Request) -> Response:
        failed = service.liveness()
        if failed is not None:
            return _json({"status": "failed", "detail": failed}, 503)
        return _json({"status": "ok"})

    @route("GET", "/readyz", None)
    async def readyz(request: Request) -> Response:
        ready, body = await service.readiness()
        return _json(body, 200 if ready else 503)

    @route("GET", "/metrics", None)
    async def get_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _problem(Problem(exc.status_code, str(exc.detail)), request.url.path)

    @app.exception_handler(EventBusError)
    async def bus_error(request: Request, exc: EventBusError) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return _problem(Problem(500, str(exc), title="Internal error"), request.url.path)

    return IngestApp(service, access, app)


def _int_path(request: Request, name: str) -> int:
    return _integer(name, request.path_params[name])


def _require_filter(flt: DeadLetterFilter, request: Request) -> None:
    if flt == DeadLetterFilter() and request.query_params.get("all") != "true":
        raise Problem(
            400,
            "give at least one filter (rule, target, status, reason, since, "
            "until, source, id) or all=true",
        )
