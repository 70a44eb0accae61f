"""The console's API on a real service (NATS, PostgreSQL, a receiving function): the live stream
(rows with rules and delivery state, narrowed by a pattern, bad patterns refused), pattern
checks, the rules sandbox (nothing published), the page and its assets, the OpenAPI document
and API keys. The browser side is ``test_console_browser.py``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from eventbus.http._console._routes import TargetStats
from eventbus.store import EmbeddedPostgres
from tests.fixtures.live import Stream, watch
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually

RULES = """
- name: orders
  match:
    type: [com.example.order.created]
  targets: [fn]
- name: summary
  match:
    type: [com.example.order.created]
    data:
      total: [{numeric: [">", 100]}]
  transform:
    input_paths: {total: $.data.total}
    template: {"amount": <total>}
  targets: [fn]
"""

KEYS = {"api_keys": [{"name": "ops", "key": "console-admin-key-0001", "scopes": ["admin"]}]}
AUTH = {"Authorization": "Bearer console-admin-key-0001"}


def _event(i: int | str, type_: str = "com.example.order.created", **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"c-{i}",
        "source": "tests/console",
        "type": type_,
        "subject": f"order-{i}",
        "data": {"total": 150},
        **extra,
    }


async def _start(eventbus: StartService, receiver: Receiver, **kw: Any) -> RunningService:
    return await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}], **kw
    )


@contextlib.asynccontextmanager
async def _watch(svc: RunningService, query: str = "", **headers: str) -> AsyncIterator[Stream]:
    async with watch(svc.session, f"{svc.url}/events/live{query}", **headers) as stream:
        yield stream


async def test_live_stream_shows_each_event_with_rules_and_state(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    async with _watch(svc) as stream:
        assert (await svc.post_event(_event(1)))[0] == 202
        assert (await svc.post_event(_event(2, type_="other")))[0] == 202
        await stream.until(lambda s: len(s.rows.get("c-1", [])) == 2 and "c-2" in s.rows)
        routing, settled = stream.rows["c-1"]
        assert routing["state"] == "routing" and settled["state"] == "delivered"
        assert settled["rules"] == ["orders", "summary"]
        assert settled["source"] == "tests/console" and settled["subject"] == "order-1"
        assert settled["type"] == "com.example.order.created" and settled["time"]
        assert stream.rows["c-2"] == [{**stream.rows["c-2"][0], "rules": [], "state": "unmatched"}]


async def test_a_client_that_leaves_frees_its_watcher(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    feed = svc.service.feed
    async with _watch(svc), _watch(svc):
        assert len(feed._watchers) == 2
    # seen at once, not at the stream's next write (an idle comment every 5 s)
    await eventually(lambda: not feed.watched, within=2, what="the watchers released")
    assert (await svc.post_event(_event(1)))[0] == 202
    await svc.drained()


async def test_head_is_answered_as_get_without_its_body_and_a_405_says_what_is_allowed(
    eventbus: StartService, receiver: Receiver
) -> None:
    # HEAD /healthz was refused 405 (an uptime check probing with HEAD saw the service down),
    # and that 405, as every one of the API's routes, had no Allow header (RFC 9110: it must)
    svc = await _start(eventbus, receiver)
    feed = svc.service.feed
    for path in ("/healthz", "/readyz", "/metrics", "/console", "/targets"):
        async with svc.session.get(svc.url + path) as got:
            body = await got.read()
        async with svc.session.head(svc.url + path) as head:
            assert head.status == got.status == 200, (path, head.status, got.status)
            assert await head.read() == b""
            assert head.headers["Content-Type"] == got.headers["Content-Type"]
            if "Content-Length" in got.headers and path != "/metrics":  # (metrics move)
                assert head.headers["Content-Length"] == str(len(body))
    # a stream: its head, then the stream is told the client left (its watcher freed)
    async with asyncio.timeout(5), svc.session.head(svc.url + "/events/live") as head:
        assert head.status == 200 and head.headers["Content-Type"].startswith("text/event-stream")
    await eventually(lambda: not feed.watched, within=2, what="the HEAD's watcher released")
    async with svc.session.head(svc.url + "/events?limit=1") as head:  # the ingest's path
        assert head.status == 200 and await head.read() == b""
    status, headers, problem = await svc.request("POST", "/healthz")
    assert (status, headers.get("Allow")) == (405, "GET, HEAD"), (headers, problem)
    status, headers, _ = await svc.request("DELETE", "/targets")
    assert (status, headers.get("Allow")) == (405, "GET, HEAD"), headers
    # every method of the path, not the first route's (DELETE /dead-letters was left out)
    status, headers, _ = await svc.request("PUT", "/dead-letters")
    assert (status, headers.get("Allow")) == (405, "GET, HEAD, DELETE"), headers
    status, headers, _ = await svc.request("PUT", "/events")
    assert (status, headers.get("Allow")) == (405, "GET, HEAD, POST"), headers


async def test_live_stream_reports_dead_letters(eventbus: StartService, receiver: Receiver) -> None:
    svc = await eventbus(
        rules="- name: all\n  targets: [gone]\n",
        targets=[
            {
                "name": "gone",
                "type": "http",
                "url": receiver.url("/gone"),
                "delivery": {"retry": "none"},
            }
        ],
    )
    receiver.respond(500)
    async with _watch(svc) as stream:
        assert (await svc.post_event(_event("dead")))[0] == 202
        await stream.until(lambda s: len(s.rows.get("c-dead", [])) == 2)
        assert stream.rows["c-dead"][1]["state"] == "dead-lettered"


async def _retrying(
    eventbus: StartService, receiver: Receiver, delay: str, *others: dict[str, Any]
) -> RunningService:
    """Every event to target fn, which retries once after ``delay`` (no circuit breaker)."""
    retry = {"strategy": "fixed", "initial_delay": delay, "max_attempts": 2, "jitter": False}
    fn = {
        "name": "fn",
        "type": "http",
        "url": receiver.url("/fn"),
        "delivery": {"retry": retry, "circuit_breaker": False},
    }
    return await eventbus(rules="- name: all\n  targets: [fn]\n", targets=[fn, *others])


async def test_live_stream_updates_a_row_when_its_retry_ends(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _retrying(eventbus, receiver, "50ms")
    async with _watch(svc) as stream:
        receiver.script(503)  # the first attempt fails, the retry is delivered
        assert (await svc.post_event(_event("later")))[0] == 202
        await stream.until(lambda s: len(s.rows.get("c-later", [])) == 3)
        routing, retrying, update = stream.rows["c-later"]
        assert routing["deliveries"] == [{"rule": "all", "target": "fn", "state": "routing"}]
        assert retrying["state"] == "retrying" and retrying["time"]
        assert retrying["deliveries"] == [{"rule": "all", "target": "fn", "state": "retrying"}]
        # from the retry schedule: that delivery's outcome, without the router's time
        assert update["state"] == "delivered" and update["time"] is None
        assert update["deliveries"] == [{"rule": "all", "target": "fn", "state": "delivered"}]
        assert update["source"] == "tests/console" and update["subject"] == "order-later"

        receiver.script(503, 503)  # the retry fails too: out of attempts
        assert (await svc.post_event(_event("lost")))[0] == 202
        await stream.until(lambda s: len(s.rows.get("c-lost", [])) == 3)
        assert [r["state"] for r in stream.rows["c-lost"]] == [
            "routing",
            "retrying",
            "dead-lettered",
        ]


async def test_live_stream_narrowed_by_a_pattern(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    pattern = quote(orjson.dumps({"subject": [{"prefix": "order-keep"}]}).decode())
    async with _watch(svc, f"?pattern={pattern}") as stream:
        for i in ("drop-1", "keep-1", "drop-2", "keep-2"):
            assert (await svc.post_event(_event(i)))[0] == 202
        await svc.drained()
        await stream.until(lambda s: len(s.rows.get("c-keep-2", [])) == 2)
        assert set(stream.rows) == {"c-keep-1", "c-keep-2"}


@pytest.mark.parametrize(
    ("pattern", "detail"),
    [
        ("{", "malformed JSON"),
        ("[1]", "a pattern must be a JSON object"),
        ('{"type": "x"}', "type"),
        ('{"data": {"n": [{"numeric": [">", "a"]}]}}', "data.n"),
        # read as /patterns/validate reads it: rounded, it was taken as another number
        ('{"x": [123456789012345678901234567890]}', "beyond 64 bits"),
    ],
    ids=["malformed", "not-an-object", "not-a-list", "bad-operand", "long-integer"],
)
async def test_live_stream_refuses_a_bad_pattern(
    eventbus: StartService, receiver: Receiver, pattern: str, detail: str
) -> None:
    svc = await _start(eventbus, receiver)
    status, headers, body = await svc.request("GET", f"/events/live?pattern={quote(pattern)}")
    assert status == 400 and headers["Content-Type"].startswith("application/problem+json")
    assert detail in body["detail"], body
    # the same check as the filter box makes while one types
    status, _, body = await svc.request("POST", "/patterns/validate", pattern.encode())
    assert status == 400 and detail in body["detail"], body


async def test_live_stream_refuses_a_long_pattern(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    # 4 KiB at most, which escaped (up to 3 times as long) still fits the request head: the
    # console's filter box had accepted patterns the stream could not be asked for
    pattern = quote(orjson.dumps({"source": ["x" * 5_000]}).decode())
    status, _, body = await svc.request("GET", f"/events/live?pattern={pattern}")
    assert status == 400 and body["detail"] == "pattern: longer than 4096 bytes", body
    pattern = quote(orjson.dumps({"source": ["x" * 17_000]}).decode())
    status, _, body = await svc.request("GET", f"/events/live?pattern={pattern}")
    # the request head is over its 16 KiB before the route sees the pattern
    assert status == 431 and "request head exceeds 16384 bytes" in body["detail"], body


async def test_validate_pattern(eventbus: StartService, receiver: Receiver) -> None:
    svc = await _start(eventbus, receiver)
    ok = orjson.dumps({"source": [{"prefix": "a"}], "$or": [{"type": ["x"]}, {"id": ["y"]}]})
    status, _, body = await svc.request("POST", "/patterns/validate", ok)
    assert (status, body) == (200, {"valid": True})
    status, _, body = await svc.request("POST", "/patterns/validate", b"")
    assert status == 400 and "empty" in body["detail"]
    big = b'{"a": ["' + b"x" * 300_000 + b'"]}'
    status, _, body = await svc.request("POST", "/patterns/validate", big)
    assert status == 413 and "max_event_size" in body["detail"]


async def test_sandbox_runs_the_rules_without_publishing(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    status, _, body = await svc.request("POST", "/rules/sandbox", orjson.dumps(_event("sb")))
    assert status == 200, body
    assert body["rules"] == 2 and body["unmatched"] == {}
    by_rule = {r["rule"]: r for r in body["routes"]}
    assert by_rule["orders"]["payload"]["id"] == "c-sb" and by_rule["orders"]["is_cloudevent"]
    assert by_rule["summary"] == {
        "rule": "summary",
        "target": "fn",
        "payload": {"amount": 150},
        "is_cloudevent": False,
    }
    small = orjson.dumps(_event("sb2", data={"total": 5}))
    status, _, body = await svc.request("POST", "/rules/sandbox", small)
    assert [r["rule"] for r in body["routes"]] == ["orders"]
    assert body["unmatched"] == {"summary": "pattern: data.total: 5 does not match"}
    await svc.drained()
    assert receiver.requests == []
    status, _, _ = await svc.request("GET", "/events/trail?source=tests/console&id=c-sb")
    assert status == 404


async def test_sandbox_says_why_a_rule_did_not_match(
    eventbus: StartService, receiver: Receiver
) -> None:
    rules = """
- name: either
  match:
    $or:
      - {type: [a]}
      - {subject: [{prefix: vip-}]}
  targets: [fn]
- name: big
  match: {source: [tests/console]}
  when: event.data.total >= 1000
  targets: [fn]
- name: broken
  match: {source: [tests/console]}
  when: event.data.nothing.deeper > 1
  targets: [fn]
- name: off
  enabled: false
  match: {source: [{prefix: ""}]}
  targets: [fn]
"""
    svc = await eventbus(
        rules=rules, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    status, _, body = await svc.request("POST", "/rules/sandbox", orjson.dumps(_event("w")))
    assert status == 200, body
    assert body["routes"] == [] and body["rules"] == 4
    unmatched = body["unmatched"]
    assert unmatched["either"] == (
        "pattern: no $or branch matched: type: 'com.example.order.created' does not match;"
        " subject: 'order-w' does not match"
    )
    assert unmatched["big"] == "condition: false"
    assert "nothing" in unmatched["broken"] and not unmatched["broken"].startswith("pattern")
    assert set(unmatched) == {"either", "big", "broken"}  # a disabled rule is not tried
    # only tried: the broken condition was counted and logged as a real event's failure (and
    # took the rule's one log line of the minute)
    assert svc.service.rules.current.cel_errors == {}
    no_subject = {k: v for k, v in _event("w2").items() if k != "subject"}
    _, _, body = await svc.request("POST", "/rules/sandbox", orjson.dumps(no_subject))
    assert "subject: absent" in body["unmatched"]["either"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"not json", "malformed JSON"),
        (b"[]", "object"),
        (b'{"specversion": "1.0", "source": "s", "type": "t"}', "id"),
        (b"", "empty"),
    ],
)
async def test_sandbox_refuses_a_bad_event(
    eventbus: StartService, receiver: Receiver, body: bytes, detail: str
) -> None:
    svc = await _start(eventbus, receiver)
    status, headers, answer = await svc.request("POST", "/rules/sandbox", body)
    assert status == 400 and headers["Content-Type"].startswith("application/problem+json")
    assert detail in answer["detail"], answer


async def test_page_and_assets(eventbus: StartService, receiver: Receiver) -> None:
    svc = await _start(eventbus, receiver, settings=KEYS)
    status, headers, page = await svc.request("GET", "/console")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<script type="module" src="console/console.js">' in page
    # in no other site's frame (its own requests pass the keyless loopback guard), and only
    # its own scripts and styles (it has no inline ones)
    assert headers["X-Frame-Options"] == "DENY"
    policy = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    assert "<style" not in page and "style=" not in page and "<script>" not in page
    # nothing from elsewhere, an icon in a data: URL included (the policy refused it at
    # every load: an error in the browser's console)
    assert "data:" not in page and "http" not in page, page
    # the service's address opened in a browser leads there (a JSON 404 said nothing)
    async with aiohttp.ClientSession() as http, http.get(svc.url + "/") as resp:
        assert resp.status == 200 and str(resp.url) == svc.url + "/console", resp.url
    assets = (("console.js", "text/javascript"), ("console.css", "text/css"))
    for asset, kind in (*assets, ("favicon.svg", "image/svg+xml")):
        status, headers, _ = await svc.request("GET", f"/console/{asset}")
        assert status == 200 and headers["Content-Type"].startswith(kind)
        assert headers["X-Content-Type-Options"] == "nosniff"
    for bad in ("index.py", "..%2F_routes.py", "nothing.js"):
        status, headers, answer = await svc.request("GET", f"/console/{bad}")
        assert status == 404 and headers["Content-Type"].startswith("application/problem+json")
        assert answer["detail"]


async def test_console_api_needs_an_admin_key(eventbus: StartService, receiver: Receiver) -> None:
    svc = await _start(
        eventbus,
        receiver,
        settings={
            "api_keys": [
                *KEYS["api_keys"],
                {"name": "pub", "key": "console-publish-key-01", "scopes": ["publish"]},
            ]
        },
    )
    event = orjson.dumps(_event(1))
    for method, path, body in (
        ("GET", "/events/live", None),
        ("POST", "/patterns/validate", b"{}"),
        ("POST", "/rules/sandbox", event),
        ("GET", "/events", None),
        ("GET", "/stats/targets", None),
    ):
        assert (await svc.request(method, path, body))[0] == 401
        publisher = {"X-API-Key": "console-publish-key-01"}
        assert (await svc.request(method, path, body, publisher))[0] == 403
    assert (await svc.request("POST", "/rules/sandbox", event, AUTH))[0] == 200
    async with _watch(svc, **AUTH) as stream:
        assert (await svc.post_event(_event(1), **AUTH))[0] == 202
        await stream.until(lambda s: "c-1" in s.rows)


async def test_routes_in_the_openapi_document(eventbus: StartService, receiver: Receiver) -> None:
    svc = await _start(eventbus, receiver)
    _, _, doc = await svc.request("GET", "/openapi.json")
    paths = doc["paths"]
    for path, method in (
        ("/console", "get"),
        ("/console/{asset}", "get"),
        ("/events/live", "get"),
        ("/patterns/validate", "post"),
        ("/rules/sandbox", "post"),
        ("/stats/rates", "get"),
        ("/stats/targets", "get"),
        ("/events", "get"),
        ("/events", "post"),
    ):
        assert method in paths[path], path
    live = paths["/events/live"]["get"]
    assert "text/event-stream" in live["responses"]["200"]["content"]
    assert [p["name"] for p in live["parameters"]] == ["pattern"]


async def test_rates_over_the_last_hour(eventbus: StartService, receiver: Receiver) -> None:
    svc = await _start(eventbus, receiver)
    for i in range(5):
        assert (await svc.post_event(_event(f"r-{i}")))[0] == 202
    await svc.drained()

    async def with_deliveries() -> Any:
        status, _, body = await svc.request("GET", "/stats/rates")
        assert status == 200, body
        return body if any(p["delivered"] > 0 for p in body["points"]) else None

    # sampled every 5 s: the point after the events holds them
    body = await eventually(with_deliveries, within=15, every=0.5, what="a point with deliveries")
    assert body["every"] == 5.0
    point = next(p for p in body["points"] if p["delivered"] > 0)
    # ten deliveries (two rules) and five events within one interval, as rates per second
    # over the interval the sampler measured (up to 6.5 s for its 5 on a loaded machine: 9.09)
    assert sum(p["delivered"] for p in body["points"]) * 5 == pytest.approx(10, rel=0.25)
    assert point["received"] > 0 and point["routed"] > 0 and point["dead_lettered"] == 0
    assert point["latency_ms"] is not None and 0 < point["latency_ms"] < 10_000
    assert all(p["latency_ms"] is None for p in body["points"] if p["delivered"] == 0)
    assert body["targets"]["fn"]["delivered"] >= 10


async def test_each_target_in_flight_rates_and_latency(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await eventbus(
        rules=RULES,
        targets=[
            {
                "name": "fn",
                "type": "http",
                "url": receiver.url("/fn"),
                "delivery": {"retry": "none"},
            },
            {"name": "idle", "type": "http", "url": receiver.url("/idle")},
        ],
    )

    async def stats() -> dict[str, Any]:
        status, _, body = await svc.request("GET", "/stats/targets")
        assert status == 200, body
        TargetStats.model_validate(body)
        return dict(body)

    receiver.script(500)  # one of the first event's two deliveries is dead-lettered
    for i in range(3):
        assert (await svc.post_event(_event(f"t-{i}")))[0] == 202
    await svc.drained()
    body = await stats()
    assert 0 < body["window"] <= 300
    fn = body["targets"]["fn"]
    # counts over the window, as rates per second (both rounded to 3 decimals)
    assert fn["delivered"] * body["window"] == pytest.approx(5, rel=0.02)
    assert fn["failed"] * body["window"] == pytest.approx(1, rel=0.02)
    assert fn["in_flight"] == 0
    assert fn["latency_ms"] > 0 and 0 < fn["p95_ms"] < 10_000  # the arithmetic: test_rates
    assert body["targets"]["idle"] == {
        "in_flight": 0,
        "delivered": 0.0,
        "failed": 0.0,
        "latency_ms": None,
        "p95_ms": None,
    }

    # a delivery waiting for the function's answer is in flight until it comes
    receiver.script(Response(200, delay=30))
    assert (await svc.post_event(_event("slow")))[0] == 202
    await receiver.wait_for(8)  # both routes sent; one of them waits

    async def one_in_flight() -> dict[str, Any] | None:
        body = await stats()
        return body if body["targets"]["fn"]["in_flight"] == 1 else None

    body = await eventually(one_in_flight, every=0.1, within=10, what="one delivery in flight")
    assert body["targets"]["idle"]["in_flight"] == 0
    assert svc.service.dispatcher.in_flight == 1


async def test_targets_count_their_retries_waiting(
    eventbus: StartService, receiver: Receiver
) -> None:
    idle = {"name": "idle", "type": "http", "url": receiver.url("/idle")}
    svc = await _retrying(eventbus, receiver, "1h", idle)
    receiver.respond(503)
    # more than a page of /retries holds (1000): counted by the database, not from a page
    batch = [_event(f"w-{i}") for i in range(1001)]
    for start in range(0, len(batch), 250):
        status, _, answer = await svc.request(
            "POST",
            "/events",
            orjson.dumps(batch[start : start + 250]),
            {"Content-Type": "application/cloudevents-batch+json"},
        )
        assert status == 202, answer
    await svc.drained()
    status, _, body = await svc.request("GET", "/targets")
    assert status == 200, body
    waiting = {t["name"]: (t["retries"], t["disabled"]) for t in body["targets"]}
    assert waiting == {"fn": (1001, None), "idle": (0, None)}
    # one event's retries, as its trail page asks for them: the one of 1,001
    source, event_id = batch[700]["source"], batch[700]["id"]

    async def attempted() -> dict[str, Any] | None:
        # past half the in-flight window, a burst's first attempts are made from the schedule
        status, _, one = await svc.request("GET", f"/retries?source={source}&id={event_id}")
        assert status == 200, one
        return one if one["items"] and one["items"][0]["attempts"] == 1 else None

    one = await eventually(attempted, within=60, what="its first attempt made")
    assert one["total"] == 1
    assert [(r["event_id"], r["target"], r["attempts"]) for r in one["items"]] == [
        (event_id, "fn", 1)
    ]
    status, _, problem = await svc.request("GET", f"/retries?source={source}")
    assert status == 400 and "'source' and 'id' go together" in problem["detail"], problem
    # a target's only (the filter was ignored: every target's retries listed, as its own)
    status, _, of_fn = await svc.request("GET", "/retries?target=fn&limit=5")
    assert (status, of_fn["total"], len(of_fn["items"])) == (200, 1001, 5), of_fn
    status, _, of_idle = await svc.request("GET", "/retries?target=idle")
    assert (status, of_idle) == (200, {"items": [], "total": 0}), of_idle
    status, _, both = await svc.request(
        "GET", f"/retries?target=idle&source={source}&id={event_id}"
    )
    assert (status, both["total"]) == (200, 0), both


async def test_answers_are_the_documented_bodies(
    eventbus: StartService, receiver: Receiver
) -> None:
    from eventbus.http._console._routes import PatternValid, RateHistory, SandboxResult

    svc = await _start(eventbus, receiver)
    status, _, body = await svc.request("POST", "/patterns/validate", b'{"type": ["x"]}')
    assert status == 200
    PatternValid.model_validate(body)  # extra="forbid": an undocumented field fails too
    status, _, body = await svc.request("POST", "/rules/sandbox", orjson.dumps(_event("doc")))
    assert status == 200
    SandboxResult.model_validate(body)
    assert body["routes"] and body["unmatched"] == {}
    status, _, body = await svc.request("GET", "/stats/rates")
    assert status == 200
    RateHistory.model_validate(body)


async def test_targets_are_described_while_the_database_is_away(
    eventbus: StartService, receiver: Receiver, postgres_server: EmbeddedPostgres
) -> None:
    """An outage is when the targets page is looked at: it answers without the database,
    disabled as this process knows it (no time) and no count of retries."""
    svc = await eventbus(
        rules="- name: all\n  targets: [fn]\n",
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
    )
    receiver.respond(410)
    assert (await svc.post_event(_event("gone")))[0] == 202
    await svc.drained()
    await postgres_server.stop()
    try:
        status, _, body = await svc.request("GET", "/targets")
    finally:
        await postgres_server.start()
    assert status == 200, body
    [fn] = body["targets"]
    assert fn["retries"] is None and fn["circuit"] == "closed"
    assert fn["disabled"] is not None and fn["disabled"]["at"] is None, fn
    assert "410" in fn["disabled"]["reason"], fn

    async def counted_again() -> bool:
        status, _, body = await svc.request("GET", "/targets")
        return status == 200 and body["targets"][0]["retries"] == 0

    await eventually(counted_again, what="the retries counted again once the database is back")
