"""The OpenAPI document (``GET /openapi.json``) describes every route of the HTTP edge, and the
bodies a running service answers with are the ones it documents (real NATS and PostgreSQL)."""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import BaseModel

from eventbus.bus._nats_server import free_port
from eventbus.http import _schemas as schemas
from eventbus.store import set_aside
from tests.cloudevents.test_notifications import OSS_RECORD
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually

# Every route of the edge: (method, path) -> what a 2xx answer holds.
ROUTES: dict[tuple[str, str], str] = {
    ("post", "/events"): "Accepted|BatchAccepted",
    ("post", "/notifications"): "BatchAccepted",
    ("post", "/hooks/{name}"): "Accepted",
    ("get", "/events"): "EventPage",
    ("get", "/events/trail"): "EventTrail",
    ("get", "/rules"): "Rules",
    ("post", "/rules/reload"): "Reloaded",
    ("get", "/dead-letters"): "DeadLetterPage",
    ("delete", "/dead-letters"): "Purged",
    ("post", "/dead-letters/replay"): "Replayed",
    ("get", "/dead-letters/count"): "DeadLetterCount",
    ("get", "/dead-letters/{dl_id}"): "DeadLetter",
    ("delete", "/dead-letters/{dl_id}"): "Purged",
    ("post", "/dead-letters/{dl_id}/replay"): "Replayed",
    ("get", "/retries"): "Retries",
    ("post", "/targets/{name}/enable"): "Enabled",
    ("post", "/targets/{name}/invoke"): "*/*",
    ("get", "/targets"): "Targets",
    ("get", "/sources"): "Sources",
    ("get", "/sources/dead-letters"): "SourceDeadLetters",
    ("get", "/healthz"): "Liveness",
    ("get", "/readyz"): "Readiness",
    ("get", "/metrics"): "text/plain",
    ("get", "/console"): "text/html",
    ("get", "/console/{asset}"): "text/javascript",
    ("get", "/events/live"): "text/event-stream",
    ("post", "/patterns/validate"): "PatternValid",
    ("post", "/rules/sandbox"): "SandboxResult",
    ("get", "/stats/rates"): "RateHistory",
    ("get", "/stats/targets"): "TargetStats",
}


def _success_schemas(operation: dict[str, Any]) -> str:
    """The 2xx answer's schema names (``A|B`` for either), or its media type without one."""
    for status, response in operation["responses"].items():
        if status.startswith("2"):
            media, content = next(iter(response["content"].items()))
            schema = content["schema"]
            refs = [s["$ref"] for s in schema.get("anyOf", [schema]) if "$ref" in s]
            return "|".join(ref.rsplit("/", 1)[1] for ref in refs) or media
    raise AssertionError(f"no 2xx answer documented: {operation}")


async def test_the_document_describes_every_route(eventbus: StartService) -> None:
    svc = await eventbus(rules="[]", targets=[])
    status, _, document = await svc.request("GET", "/openapi.json")
    assert status == 200
    paths = document["paths"]
    found = {(m, p): _success_schemas(op) for p, ops in paths.items() for m, op in ops.items()}
    assert found == ROUTES
    components = document["components"]["schemas"]
    assert "HTTPValidationError" not in components  # parameters are answered 400, never 422
    for (method, path), _ in ROUTES.items():
        operation = paths[path][method]
        errors = {s: r for s, r in operation["responses"].items() if s[0] in "45"}
        for status_code, response in errors.items():
            if path in ("/healthz", "/readyz"):
                continue  # their 503 is the same body as their 200
            assert list(response["content"]) == ["application/problem+json"], (path, status_code)
    trail = paths["/events/trail"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in trail] == [("source", "query"), ("id", "query")]
    search = {p["name"]: p for p in paths["/events"]["get"]["parameters"]}
    assert list(search) == ["source", "type", "since", "until", "limit", "after"]
    assert {p["in"] for p in search.values()} == {"query"}
    assert search["since"]["schema"]["anyOf"][0] == {"type": "string", "format": "date-time"}
    assert search["after"]["schema"]["anyOf"][0] == {"type": "string"}
    assert search["limit"]["schema"]["maximum"] == 1000
    listing = {p["name"]: p["schema"] for p in paths["/dead-letters"]["get"]["parameters"]}
    assert listing["limit"] == {
        "type": "integer",
        "maximum": 1000,
        "minimum": 1,
        "description": "How many items at most.",
        "default": 100,
        "title": "Limit",
    }
    assert listing["since"]["anyOf"][0] == {"type": "string", "format": "date-time"}


async def test_the_ingest_routes_are_described_in_every_content_mode(
    eventbus: StartService,
) -> None:
    svc = await eventbus(rules="[]", targets=[])
    _, _, document = await svc.request("GET", "/openapi.json")
    events = document["paths"]["/events"]["post"]
    content = events["requestBody"]["content"]
    assert content["application/cloudevents+json"]["schema"] == {
        "$ref": "#/components/schemas/CloudEvent"
    }
    assert content["application/cloudevents-batch+json"]["schema"]["items"] == {
        "$ref": "#/components/schemas/CloudEvent"
    }
    assert "Binary mode" in content["*/*"]["schema"]["description"]
    headers = {p["name"]: p for p in events["parameters"] if p["in"] == "header"}
    assert sorted(headers) == [
        "X-Eventbus-Invocation-Type",
        "ce-id",
        "ce-source",
        "ce-specversion",
        "ce-type",
    ]
    assert headers["ce-specversion"]["schema"]["enum"] == ["1.0"]
    assert headers["X-Eventbus-Invocation-Type"]["schema"]["enum"] == ["sync", "async"]
    answers = events["responses"]
    assert {"202", "207", "400", "413", "415", "503"} <= set(answers)
    # a synchronous publish: the target's answer, or why there is none
    assert {"200", "404", "409", "429", "502", "504"} <= set(answers)
    assert set(answers["202"]["headers"]) == {"Eventbus-Duplicate", "Eventbus-Duplicates"}
    notifications = document["paths"]["/notifications"]["post"]
    assert list(notifications["requestBody"]["content"]) == ["application/json"]
    assert set(notifications["responses"]["202"]["headers"]) == {"Eventbus-Duplicates"}
    for operation in (events, notifications):
        for status, answer in operation["responses"].items():
            if status.startswith(("4", "5")):
                assert list(answer["content"]) == ["application/problem+json"], status
    components = document["components"]["schemas"]
    for name in ("CloudEvent", "Accepted", "BatchAccepted", "BatchEntry", "ProblemDetails"):
        assert name in components, name
    assert "duplicate" in components["Accepted"]["required"]


async def test_the_docs_page_works_offline(eventbus: StartService) -> None:
    """/docs loads Swagger UI from the service itself: every asset it names is a local path
    the service serves, and no part of the page points off the machine."""
    svc = await eventbus(rules="[]", targets=[])
    status, headers, page = await svc.request("GET", "/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    # no other site may frame it: its "Try it out" would send the service's own Origin
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(assets) == 3
    assert not re.search(r"https?://", page)
    assert "validatorUrl" in page and '"validatorUrl": null' in page
    assert "url: '/openapi.json'" in page
    kinds = {}
    for asset in assets:
        assert asset.startswith("/docs/assets/"), asset
        async with svc.session.get(svc.url + asset) as resp:
            assert resp.status == 200, asset
            kinds[asset.rsplit(".", 1)[1]] = (resp.content_type, await resp.read())
    assert kinds["js"][0] == "text/javascript" and b"SwaggerUIBundle" in kinds["js"][1]
    assert kinds["css"][0] == "text/css" and b".swagger-ui" in kinds["css"][1]
    assert kinds["png"][0] == "image/png"
    async with svc.session.get(svc.url + "/docs/assets/LICENSE") as resp:
        assert resp.status == 200 and b"Apache License" in await resp.read()
    status, _, _ = await svc.request("GET", "/docs/assets/../_api.py")
    assert status == 404
    _, _, document = await svc.request("GET", "/openapi.json")
    assert document["openapi"].startswith("3.1")  # which Swagger UI 4 cannot render


def _check(model: type[BaseModel], body: Any) -> None:
    model.model_validate(body)  # extra="forbid": an undocumented field fails too


async def _answer(
    svc: RunningService, method: str, path: str, body: Any = None, content_type: str = ""
) -> tuple[int, Any]:
    raw = None if body is None else orjson.dumps(body)
    status, _, answer = await svc.request(
        method, path, raw, {"Content-Type": content_type} if content_type else {}
    )
    return status, answer


async def test_answers_are_the_documented_bodies(eventbus: StartService) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/nobody"
    svc = await eventbus(
        rules="- name: all\n  targets: [dead]\n",
        targets=[{"name": "dead", "type": "http", "url": nobody, "delivery": {"retry": "none"}}],
    )
    event = {"specversion": "1.0", "id": "oa-1", "source": "tests/openapi", "type": "t"}
    status, body = await _answer(svc, "POST", "/events", event, "application/cloudevents+json")
    assert status == 202
    _check(schemas.Accepted, body)
    batch = [{**event, "id": "oa-2"}, {"specversion": "1.0"}]
    status, body = await _answer(
        svc, "POST", "/events", batch, "application/cloudevents-batch+json"
    )
    assert status == 207
    _check(schemas.BatchAccepted, body)
    status, body = await _answer(svc, "POST", "/notifications", {"events": [OSS_RECORD]})
    assert status == 202
    _check(schemas.BatchAccepted, body)
    status, body = await _answer(svc, "POST", "/notifications", {"events": [{}]})
    assert status == 400
    _check(schemas.ProblemDetails, body)

    await svc.trail("tests/openapi", "oa-1", attempts=1)

    async def dead_lettered() -> bool:
        status, page = await _answer(svc, "GET", "/dead-letters")
        return status == 200 and len(page["items"]) == 3

    await eventually(dead_lettered, what="the three valid events dead-lettered")
    await set_aside(svc.service.store.pool, "tests-src", b"\xff", "not an event", {"k": 1})

    status, body = await _answer(svc, "GET", "/events/trail?source=tests/openapi&id=oa-1")
    assert status == 200 and body["attempts"]
    _check(schemas.EventTrail, body)
    status, page = await _answer(svc, "GET", "/events?source=tests/openapi&limit=1")
    assert status == 200 and page["next_after"] is not None
    _check(schemas.EventPage, page)
    status, page = await _answer(svc, "GET", "/dead-letters?limit=1")
    assert status == 200 and page["next_after"] is not None
    _check(schemas.DeadLetterPage, page)
    first = page["items"][0]["id"]
    status, body = await _answer(svc, "GET", f"/dead-letters/{first}")
    assert status == 200
    _check(schemas.DeadLetter, body)
    status, body = await _answer(svc, "GET", "/sources/dead-letters")
    assert status == 200 and body["items"][0]["payload_base64"] == "/w=="
    _check(schemas.SourceDeadLetters, body)
    for path, model in (
        ("/rules", schemas.Rules),
        ("/targets", schemas.Targets),
        ("/retries", schemas.Retries),
        ("/sources", schemas.Sources),
        ("/healthz", schemas.Liveness),
        ("/readyz", schemas.Readiness),
    ):
        status, body = await _answer(svc, "GET", path)
        assert status == 200, path
        _check(model, body)
    status, body = await _answer(svc, "POST", "/rules/reload")
    assert status == 200
    _check(schemas.Reloaded, body)
    status, body = await _answer(svc, "POST", f"/dead-letters/{first}/replay")
    assert status == 202 and len(body["replayed"]) == 1
    _check(schemas.Replayed, body)
    status, body = await _answer(svc, "DELETE", "/dead-letters?all=true")
    assert status == 200
    _check(schemas.Purged, body)
    status, body = await _answer(svc, "GET", "/dead-letters?limit=0")
    assert status == 400 and body["detail"].startswith("limit must be an integer")
    _check(schemas.ProblemDetails, body)
