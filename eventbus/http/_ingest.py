"""The hot HTTP path: ``POST /events`` and ``POST /notifications`` served as bare ASGI, in front
of the FastAPI application (``_api``) that serves everything else (``GET /events``, the search
of accepted events, included).

Where it sits: the first thing a published event meets. Measured on the 2-core machine, the
framework layers around a FastAPI route (middleware stack, routing, request objects) cost more
CPU than the ingest work itself, so this path reads the body straight from ``receive``
(bounded), parses it with ``eventbus.cloudevents`` (orjson), publishes it to the durable bus
and answers; a 2xx means the event is on the bus (guarantee 1).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from eventbus import metrics
from eventbus._errors import BusUnavailable, CloudEventError, EventTooLargeForBus
from eventbus.cloudevents import (
    BATCH_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
    notification_to_events,
    parse_http,
)
from eventbus.http._access import Access
from eventbus.http._problem import PROBLEM, Problem, count_refused, problem_answer, problem_for
from eventbus.http._types import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    read_body,
    request_headers,
    send_answer,
)

if TYPE_CHECKING:
    from eventbus.app import Service

__all__ = ["INGEST_OPERATIONS", "IngestApp"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_DUPLICATE_HEADERS = {
    "Eventbus-Duplicate": {
        "description": "One event: `true` when the bus already held its source+id (stored "
        "within the duplicate window), so it is not delivered again; absent otherwise",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Eventbus-Duplicates": {
        "description": "A batch: how many entries were such duplicates; absent when none",
        "schema": {"type": "integer", "minimum": 1},
    },
}


def _answers(accepted: dict[str, Any], single: bool, *problems: int) -> dict[str, Any]:
    problem = {"content": {PROBLEM: {"schema": _ref("ProblemDetails")}}}
    batch = {"application/json": {"schema": _ref("BatchAccepted")}}
    duplicates = {"Eventbus-Duplicates": _DUPLICATE_HEADERS["Eventbus-Duplicates"]}
    return {
        "202": {
            "description": "On the durable bus (or already there: a duplicate)",
            "headers": _DUPLICATE_HEADERS if single else duplicates,
            "content": accepted,
        },
        "207": {
            "description": "A batch of which some entries failed",
            "headers": duplicates,
            "content": batch,
        },
        **{str(status): {"description": _TITLES[status], **problem} for status in problems},
    }


_TITLES = {
    400: "Invalid request or event",
    401: "No or unknown API key",
    403: "The key lacks scope publish, or the client's address is not allowed",
    405: "Not POST",
    408: "The body did not arrive in time",
    413: "The body or the batch is too large",
    415: "A CloudEvents format other than JSON",
    404: "Synchronous: no rule with sync: true matches the event",
    409: "Synchronous: several rules with sync: true match the event, or its target is disabled",
    422: "The event bus refused the event (or, synchronous: the transform of the rule with "
    "sync: true that matches the event failed on it)",
    429: "Synchronous: the target's concurrency cap is full (Retry-After)",
    502: "Synchronous: the target could not be reached",
    503: "The event bus is unavailable (or, synchronous: the target's circuit is open): retry "
    "later",
    504: "Synchronous: the target did not answer within its timeout",
}
_REFUSED = (400, 401, 403, 405, 408, 413, 422, 503)

INGEST_OPERATIONS: dict[str, dict[str, Any]] = {
    "/events": {
        "post": {
            "summary": "Publish CloudEvents: 202 once they are on the durable bus",
            "description": (
                "Structured mode (one event), batch mode (a JSON array; each entry answered on "
                "its own, 207 when any failed) or binary mode (any other Content-Type: the "
                "attributes in ce-* headers, the body is the event's data). With "
                "X-Eventbus-Invocation-Type: sync, one event is sent by the one rule marked "
                "sync: true that it matches to that rule's target, and the answer is the "
                "target's (its status, content type and body), as POST /targets/{name}/invoke "
                "answers; the event is not put on the bus."
            ),
            "operationId": "publish_events",
            "parameters": [
                {
                    "name": "X-Eventbus-Invocation-Type",
                    "in": "header",
                    "required": False,
                    "description": "sync: wait for the answer of the target of the one rule "
                    "marked sync: true the event matches; async (the default): 202 once on the "
                    "bus",
                    "schema": {"type": "string", "enum": ["sync", "async"]},
                },
                *(
                    {
                        "name": f"ce-{name}",
                        "in": "header",
                        "required": False,
                        "description": f"Binary mode (required there): the event's {name}",
                        "schema": {"type": "string", **extra},
                    }
                    for name, extra in (
                        ("specversion", {"enum": ["1.0"]}),
                        ("id", {"minLength": 1}),
                        ("source", {"minLength": 1}),
                        ("type", {"minLength": 1}),
                    )
                ),
            ],
            "requestBody": {
                "required": True,
                "content": {
                    STRUCTURED_CONTENT_TYPE: {"schema": _ref("CloudEvent")},
                    BATCH_CONTENT_TYPE: {"schema": {"type": "array", "items": _ref("CloudEvent")}},
                    "*/*": {
                        "schema": {
                            "description": "Binary mode: the event's data, its media type the "
                            "event's datacontenttype; the attributes in ce-* headers"
                        }
                    },
                },
            },
            "responses": _answers(
                {
                    "application/json": {
                        "schema": {"anyOf": [_ref("Accepted"), _ref("BatchAccepted")]}
                    }
                },
                True,
                *_REFUSED,
                415,
                404,
                409,
                429,
                502,
                504,
            )
            | {
                "200": {
                    "description": "Synchronous: the target's own answer (any status), as "
                    "POST /targets/{name}/invoke passes it through",
                    "content": {"*/*": {"schema": {"description": "the target's answer"}}},
                }
            },
        }
    },
    "/notifications": {
        "post": {
            "summary": "Publish bucket notifications (S3, MinIO, Alibaba OSS), one event each",
            "description": (
                'An S3 or MinIO notification ({"Records": [...]}) or an OSS one '
                '({"events": [...]}); every record becomes a CloudEvent (the S3 adapter\'s '
                "mapping), answered per entry."
            ),
            "operationId": "publish_notifications",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "responses": _answers(
                {"application/json": {"schema": _ref("BatchAccepted")}}, False, *_REFUSED
            ),
        }
    },
}
"""The ingest routes in the OpenAPI document (``GET /openapi.json``): served here, not by the
FastAPI application that writes the document."""


_Answer = tuple[int, Any, dict[str, str]]
"""Status, JSON body and extra headers of an ingest answer."""


def _synchronous(scope: Scope) -> bool:
    """Whether the request asks for a synchronous answer: an ``X-Eventbus-Invocation-Type``
    other than ``async`` (ASGI header names are lower-case). The synchronous route refuses a
    value other than ``sync`` (a mistyped one was published asynchronously, answered 202)."""
    return any(
        name == b"x-eventbus-invocation-type" and value.strip().lower() != b"async"
        for name, value in scope["headers"]
    )


class IngestApp:
    """ASGI: serves the ingest routes itself and hands every other request to ``fallback``."""

    def __init__(self, service: Service, access: Access, fallback: ASGIApp) -> None:
        self._service = service
        self._fallback = fallback
        self._access = access
        self._max_event = service.settings.max_event_size
        self._max_batch = service.settings.max_batch_entries
        self._max_request = self._max_event * 4
        self._routes: dict[str, Callable[[Mapping[str, str], bytes], Awaitable[_Answer]]] = {
            "/events": self._events,
            "/notifications": self._notifications,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None or (
            handler == self._events and (scope["method"] in ("GET", "HEAD") or _synchronous(scope))
        ):
            # GET (and HEAD) /events searches the audit (_api); a synchronous POST /events
            # waits for a target's answer (_invoke)
            await self._fallback(scope, receive, send)
            return
        path = scope["path"]
        extra: Mapping[str, str] = {}
        status, body, media = 200, b"", "application/json"
        via = "http" if handler == self._events else "http:notification"
        try:
            if scope["method"] != "POST":
                allow = "GET, HEAD, POST" if handler == self._events else "POST"
                raise Problem(405, f"{path} accepts {allow} only", headers={"Allow": allow})
            headers = request_headers(scope["headers"])
            client = scope.get("client")
            await self._access.check(headers, path, client[0] if client else None, "publish")
            raw = await read_body(receive, headers, self._max_request)
            status, payload, extra = await handler(headers, raw)
            body = orjson.dumps(payload)
        except Exception as exc:
            count_refused(via, exc)
            answer = problem_answer(exc, path)
            if answer is None:
                raise
            status, extra, body = answer
            media = PROBLEM
        await send_answer(send, status, media, body, extra)

    async def _events(self, headers: Mapping[str, str], raw: bytes) -> _Answer:
        parsed = parse_http(headers, raw, max_size=self._max_event, max_entries=self._max_batch)
        return await self._accept(parsed.events, parsed.batch, "http")

    async def _notifications(self, headers: Mapping[str, str], raw: bytes) -> _Answer:
        """S3 / MinIO / OSS bucket notifications, one CloudEvent per record."""
        events: list[dict[str, Any] | CloudEventError] = list(
            notification_to_events(raw, max_records=self._max_batch, max_size=self._max_event)
        )
        return await self._accept(events, True, "http:notification")

    async def _accept(
        self, events: list[dict[str, Any] | CloudEventError], batch: bool, via: str
    ) -> _Answer:
        """Publish the valid events; answer for one event, or per entry (like PutEvents).

        A duplicate (the bus already held its source+id, so it is not delivered again) is
        answered 202 like a stored event, but says so: ``"duplicate": true`` in its body or
        entry, and the ``Eventbus-Duplicate`` header (single) or ``Eventbus-Duplicates`` (the
        count, batch).
        """
        valid = [e for e in events if not isinstance(e, CloudEventError)]
        # Audited as accepted when the router takes them off the bus (crash-safe).
        outcomes = await self._service.publish_many(valid, via=via) if valid else []
        accepted, duplicates = outcomes.count(None), outcomes.count("duplicate")
        if accepted:
            metrics.EVENTS_RECEIVED.labels(via).inc(accepted)
        if duplicates:
            metrics.EVENTS_DUPLICATE.labels(via).inc(duplicates)
        results = iter(outcomes)
        if not batch:
            (single,) = valid  # a single bad event raised in parse_http already
            err = next(results)
            if isinstance(err, BaseException):
                problem = problem_for(err) if isinstance(err, Exception) else None
                _refused(via, 500 if problem is None else problem.status)
                raise err
            duplicate = err == "duplicate"
            body = {"id": single["id"], "source": single["source"], "duplicate": duplicate}
            return 202, body, {"Eventbus-Duplicate": "true"} if duplicate else {}
        entries: list[dict[str, Any]] = []
        failed = unavailable = 0
        for entry in events:
            if isinstance(entry, CloudEventError):
                failed += 1
                _refused(via, entry.status)
                entries.append({"status": entry.status, "error": entry.detail})
                continue
            err = next(results)
            if not isinstance(err, BaseException):
                entries.append(
                    {
                        "status": 202,
                        "id": entry["id"],
                        "source": entry["source"],
                        "duplicate": err == "duplicate",
                    }
                )
                continue
            failed += 1
            down = isinstance(err, BusUnavailable)
            unavailable += down
            status = 503 if down else _entry_status(err)
            _refused(via, status)
            entries.append(
                {
                    "status": status,
                    "id": entry["id"],
                    "source": entry["source"],
                    "error": str(err),
                }
            )
        if unavailable and unavailable == len(entries):
            raise BusUnavailable("no entry of the batch could be stored")
        body = {"failed": failed, "duplicates": duplicates, "entries": entries}
        headers = {"Eventbus-Duplicates": str(duplicates)} if duplicates else {}
        return (207 if failed else 202), body, headers


def _refused(via: str, status: int) -> None:
    """Count one event refused (``eventbus_events_rejected_total``, the status it was answered
    as its reason): a single one the bus could not take, any refused entry of a batch. A
    request refused for its event or body is counted where it is answered (``count_refused``)."""
    metrics.EVENTS_REJECTED.labels(via, str(status)).inc()


def _entry_status(err: BaseException) -> int:
    """A batch entry's status for an event the bus refused: 413 when it is too large for the
    broker, else 500."""
    return 413 if isinstance(err, EventTooLargeForBus) else 500
